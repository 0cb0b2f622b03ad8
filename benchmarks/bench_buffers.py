"""Large buffers (issue 14, item 2): what a large argument or result costs.

Run from the repository's root with an environment that has numpy (the test
extra: ``.venv/bin/python benchmarks/bench_buffers.py``); ``--only`` picks
measures (``dump_call``, ``round_trip``, ``echo_bytes``, ``array_8``,
``array_40``). To compare with another checkout, put it first on
``PYTHONPATH`` (the fork server gets the parent's ``sys.path``).

- ``dump_call``: microseconds to pickle a small plain call and a small
  cloudpickled one (the path every task takes).
- ``round_trip``: a warm ``submit(...).result()`` of a tiny task.
- ``echo_bytes``: a 10 MB ``bytes`` sent to a task and returned.
- ``array_8``: an 80 MB float64 array submitted to 8 tasks: wall time, the
  parent's peak RSS growth (sampled every 10 ms), the system's ``Shmem``
  growth (where the segments are).
- ``array_40``: a 400 MB array summed by 40 tasks: wall time, peak PSS of
  the parent and its workers (``smaps_rollup``, sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy
import psutil

from pool_manager import BaseWorkerPool
from pool_manager._protocol import dump_call


def echo(value: Any) -> Any:
    return value


def square(x: int) -> int:
    return x * x


def first(array: Any) -> float:
    return float(array.flat[0])


def total(array: Any) -> float:
    return float(array.sum())


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pss_of_tree() -> int:
    me = psutil.Process()
    size = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        size += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return size


def _shmem() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    """The largest value of ``measure`` while in the ``with`` block (sampled)."""

    def __init__(self, measure: Callable[[], int], interval: float) -> None:
        self._measure, self._interval = measure, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure())
            time.sleep(self._interval)

    def __enter__(self) -> _Peak:
        self.peak = self._measure()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._measure())


def measure_dump_call() -> None:
    calls: list[tuple[str, Callable[..., Any], tuple[Any, ...], int]] = [
        ("plain abs(3)", abs, (3,), 200_000),
        ("plain abs(b'x' * 100)", abs, (b"x" * 100,), 200_000),
        ("cloudpickle echo([1, 2, 3])", echo, ([1, 2, 3],), 40_000),
    ]
    for label, fn, args, number in calls:
        best = min(
            timeit.repeat(functools.partial(dump_call, fn, args, {}), number=number, repeat=5)
        )
        print(f"dump_call {label}: {best / number * 1e6:.2f} us")


def measure_round_trip(pool: BaseWorkerPool) -> None:
    for _ in range(300):
        pool.submit(abs, 3).result()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(2000):
            pool.submit(abs, 3).result()
        best = min(best, (time.perf_counter() - start) / 2000)
    print(f"warm round trip: {best * 1e6:.1f} us")


def measure_echo_bytes(pool: BaseWorkerPool) -> None:
    data = os.urandom(10 << 20)
    for _ in range(3):
        assert pool.submit(echo, data).result() == data
    times = []
    for _ in range(21):
        start = time.perf_counter()
        result = pool.submit(echo, data).result()
        times.append(time.perf_counter() - start)
        assert result == data
    print(
        f"10 MB bytes echo: median {statistics.median(times) * 1e3:.1f} ms, "
        f"best {min(times) * 1e3:.1f} ms"
    )


def measure_array_8(pool: BaseWorkerPool) -> None:
    array = numpy.random.default_rng(0).random(10_000_000)  # 80 MB
    pool.submit(abs, 1).result()
    gc.collect()
    rss, shmem = _rss(os.getpid()), _shmem()
    with _Peak(lambda: _rss(os.getpid()), 0.01) as rss_peak, _Peak(_shmem, 0.01) as shm_peak:
        start = time.perf_counter()
        futures = [pool.submit(first, array) for _ in range(8)]
        assert [f.result() for f in futures] == [array[0]] * 8
        elapsed = time.perf_counter() - start
    growth = rss_peak.peak - rss
    print(
        f"80 MB array x 8 tasks: {elapsed * 1e3:.0f} ms; parent RSS peak growth "
        f"{growth / 1e6:.0f} MB ({growth / array.nbytes:.2f}x the array); system Shmem "
        f"peak growth {(shm_peak.peak - shmem) / 1e6:.0f} MB"
    )


def measure_array_40(pool: BaseWorkerPool) -> None:
    array = numpy.random.default_rng(0).random(50_000_000)  # 400 MB
    pool.submit(abs, 1).result()
    gc.collect()
    before = _pss_of_tree()
    with _Peak(_pss_of_tree, 0.05) as peak:
        start = time.perf_counter()
        futures = [pool.submit(total, array) for _ in range(40)]
        assert len({f.result() for f in futures}) == 1
        elapsed = time.perf_counter() - start
    growth = peak.peak - before
    print(
        f"400 MB array x 40 tasks: {elapsed:.2f} s; PSS of parent and workers: peak "
        f"{peak.peak / 1e6:.0f} MB, {peak.peak / array.nbytes:.2f}x the array (the caller's "
        f"own array included); growth {growth / 1e6:.0f} MB, {growth / array.nbytes:.2f}x"
    )


MEASURES: dict[str, Callable[..., None]] = {
    "round_trip": measure_round_trip,
    "echo_bytes": measure_echo_bytes,
    "array_8": measure_array_8,
    "array_40": measure_array_40,
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="dump_call," + ",".join(MEASURES))
    parser.add_argument("--workers", type=int, default=2)
    chosen = parser.parse_args(argv).only.split(",")
    if "dump_call" in chosen:
        measure_dump_call()
    with BaseWorkerPool(parser.parse_args(argv).workers) as pool:
        for name, measure in MEASURES.items():
            if name in chosen:
                measure(pool)


if __name__ == "__main__":
    main(sys.argv[1:])
