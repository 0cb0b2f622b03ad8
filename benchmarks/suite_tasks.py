"""The functions the suite's worker processes run, and a helper its scripts share.

They live in a module of their own, importable by name in every worker (as
``benchmarks.suite_tasks``: the samples run from the repository's root, and
every library's workers get their path), so that every library sends them by
reference: a function defined in ``__main__`` would be pickled by value by
cloudpickle-based libraries (loky, pool_manager) and by reference by the
others, which would skew the per-task figures.
"""

from __future__ import annotations

import time
from typing import Any


def noop() -> None:
    """A task that does nothing: the per-task cost of a pool, and nothing else."""


def ident(value: int) -> int:
    """A no-op that takes and returns one item, for ``map``."""
    return value


def echo(data: bytes) -> bytes:
    """Return the argument: a payload's way to the worker and back."""
    return data


def nap(seconds: float) -> None:
    """Sleep; a few of these at once make every worker of a pool start."""
    time.sleep(seconds)


def burn(iterations: int) -> int:
    """Pure-Python CPU work: ``iterations`` turns of an integer loop.

    Its length is calibrated in iterations, not in clock time: a task that
    spins until a deadline would finish on time even when it shares a core,
    and would hide a pool that starts more processes than there are cores.
    """
    total = 0
    for i in range(iterations):
        total = (total + i * i) & 0xFFFFFFFF
    return total


def cpu_burn(iterations: int) -> float:
    """`burn`, returning the CPU seconds it took in the thread that ran it."""
    started = time.thread_time()
    burn(iterations)
    return time.thread_time() - started


def timed_burn(iterations: int) -> float:
    """Seconds that ``burn(iterations)`` takes in this process."""
    started = time.perf_counter()
    burn(iterations)
    return time.perf_counter() - started


def calibrate(seconds: float, *, samples: int = 5) -> tuple[int, float]:
    """Iterations of `burn` that take ``seconds`` here, and the median time they took."""
    probe = 200_000
    timed_burn(probe)  # warm up
    per_iteration = min(timed_burn(probe) for _ in range(3)) / probe
    iterations = max(1, round(seconds / per_iteration))
    median = 0.0
    for attempt in range(4):  # refine: the probe is short, the real task is not
        times = sorted(timed_burn(iterations) for _ in range(samples))
        median = times[len(times) // 2]
        if abs(median - seconds) / seconds < 0.02 or attempt == 3:
            break
        iterations = max(1, round(iterations * seconds / median))
    return iterations, median


def is_tracker(cmdline: list[str]) -> bool:
    """Whether a process is multiprocessing's or loky's resource tracker."""
    return "_tracker import main" in " ".join(cmdline)


def strided_sum(array: Any) -> float:
    """A cheap read of a large numpy array: every 4,096th value, summed.

    The task costs little (it touches one page in eight), so what a
    large-data measure times is the array's way to the worker.
    """
    return float(array[::4096].sum())


def matmul(size: int, products: int, seed: int) -> float:
    """``products`` products of two ``size`` × ``size`` float64 matrices: numpy's
    BLAS, which runs as many threads as the worker's native thread pools allow."""
    import numpy

    rng = numpy.random.default_rng(seed)
    a, b = rng.random((size, size)), rng.random((size, size))
    product = a
    for _ in range(products):
        product = a @ b
    return float(product[0, 0])


def blas_threads_after(seconds: float) -> list[int]:
    """Import numpy, then sleep (a few of these at once reach every worker): the
    thread count of each BLAS/OpenMP library loaded here (threadpoolctl's
    view; empty without it)."""
    import numpy  # noqa: F401  (as the tasks would: after the worker started)

    time.sleep(seconds)
    try:
        import threadpoolctl
    except ImportError:
        return []
    return [int(info["num_threads"]) for info in threadpoolctl.threadpool_info()]


def strided_sum_shared() -> float:
    """`strided_sum` of the pool's shared data (``pool_manager.shared_data()``)."""
    from pool_manager import shared_data

    return strided_sum(shared_data())
