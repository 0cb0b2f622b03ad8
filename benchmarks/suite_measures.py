"""One sample of one measure for one library, in a process of its own.

`suite.py` runs this module once per (measure, library, round), from the
repository's root, so every sample starts from a fresh interpreter: a cold
start is really cold, and no library's threads, trackers or workers linger
into another's figures.

    python -m benchmarks.suite_measures MEASURE LIBRARY --params JSON --result FILE

The sample goes to FILE as JSON: ``{"value": float | null, "note": str, ...}``;
``value`` is null when the measure does not apply to the library, and
``note`` says why. Each pool is shut down in a ``finally`` block; whatever
outlives this process is killed by `suite.py` (it runs this module in a
process group of its own).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

import psutil

from benchmarks.suite_memory import JobPeak, ParentPeak
from benchmarks.suite_tasks import (
    blas_threads_after,
    burn,
    cpu_burn,
    echo,
    ident,
    is_tracker,
    matmul,
    nap,
    noop,
    strided_sum,
    strided_sum_shared,
    timed_burn,
)

Waiter = Callable[[], Any]
Result = dict[str, Any]


class NotApplicable(Exception):
    """The measure has no meaning for this library; the message says why."""


# -- the libraries, behind one small interface ------------------------------


class Pool:
    """A library's process pool as the measures use it.

    ``submit`` returns a function that waits for the result; ``map`` returns
    the results as a list (``chunksize=None``: the library's automatic chunk
    size, if it has one).
    """

    name = "?"
    auto_chunksize = True  # map(..., chunksize=None) picks a chunk size

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run_all(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        """``fn(*args)`` for each of ``calls``: all submitted, then all waited for."""
        waits = [self.submit(fn, *args) for args in calls]
        return [wait() for wait in waits]

    def worker_pids(self) -> list[int]:
        """Worker pids: by default the children of this process that are not trackers."""
        return [child.pid for child in _worker_children()]


class PoolManagerPool(Pool):
    """pool_manager's pool: ``BaseWorkerPool(workers)`` (the fork server's engine)."""

    name = "pool_manager"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._cls = self.pool_class()
        self._pool: Any = None

    @staticmethod
    def pool_class() -> type[Any]:
        from pool_manager import BaseWorkerPool

        return BaseWorkerPool

    def start(self) -> None:
        self._pool = self._cls(self.workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        return self._pool.submit(fn, *args).result  # type: ignore[no-any-return]

    @property
    def auto_chunksize(self) -> bool:  # type: ignore[override]
        return pool_manager_has_auto_chunksize(self._cls)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        if chunksize is None:
            return list(self._pool.map(fn, items))
        return list(self._pool.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def worker_pids(self) -> list[int]:
        return list(self._pool.worker_pids())


class PoolManagerLokyPool(PoolManagerPool):
    """pool_manager's loky engine: ``pool_manager.loky.LokyWorkerPool(workers)``, each
    worker a one-worker ``loky.ProcessPoolExecutor`` (a slot) of its own."""

    name = "pool_manager (loky engine)"

    @staticmethod
    def pool_class() -> type[Any]:
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool


class PoolManagerNativeThreadsNonePool(PoolManagerPool):
    """pool_manager with ``native_threads=None``: its workers' BLAS and OpenMP
    thread pools left as numpy makes them (a thread per CPU in each worker)."""

    name = "pool_manager (native_threads=None)"

    def start(self) -> None:
        if "native_threads" not in inspect.signature(self._cls).parameters:
            raise NotApplicable("n/a (this pool_manager has no native_threads)")
        self._pool = self._cls(self.workers, native_threads=None)


def pool_manager_has_auto_chunksize(cls: type[Any] | None = None) -> bool:
    """Whether pool_manager's ``map`` (``cls``'s: default `BaseWorkerPool`'s) picks a
    chunk size itself (its default is None)."""
    if cls is None:
        cls = PoolManagerPool.pool_class()
    parameter = inspect.signature(cls.map).parameters.get("chunksize")
    return parameter is not None and parameter.default is None


class ExecutorPool(Pool):
    """``concurrent.futures.ProcessPoolExecutor`` with a given start method."""

    auto_chunksize = False

    def __init__(self, workers: int, method: str = "fork") -> None:
        super().__init__(workers)
        from concurrent.futures import ProcessPoolExecutor

        self.name = f"ProcessPoolExecutor ({method})"
        self._cls = ProcessPoolExecutor
        self._context = multiprocessing.get_context(method)
        self._pool: Any = None

    def start(self) -> None:
        self._pool = self._cls(self.workers, mp_context=self._context)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        return self._pool.submit(fn, *args).result  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        return list(self._pool.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class LokyPool(ExecutorPool):
    name = "loky"

    def __init__(self, workers: int) -> None:
        Pool.__init__(self, workers)
        import loky

        self._loky = loky
        self._pool = None

    def start(self) -> None:
        self._pool = self._loky.ProcessPoolExecutor(self.workers)


class PebblePool(Pool):
    name = "pebble"
    auto_chunksize = False

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        import pebble

        self._cls = pebble.ProcessPool
        self._pool: Any = None

    def start(self) -> None:
        self._pool = self._cls(self.workers, context=multiprocessing.get_context("fork"))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        return self._pool.schedule(fn, args=args).result  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        return list(self._pool.map(fn, items, chunksize=chunksize).result())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join(timeout=30)
            if self._pool.active:
                self._pool.stop()
                self._pool.join(timeout=10)


class MpirePool(Pool):
    name = "mpire"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        from mpire.pool import WorkerPool  # (mpire/__init__.py does not re-export it for mypy)

        self._cls = WorkerPool
        self._pool: Any = None

    def start(self) -> None:
        self._pool = self._cls(n_jobs=self.workers, start_method="fork", keep_alive=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        return self._pool.apply_async(fn, args=args).get  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        # chunk_size=None: mpire's own chunking (four chunks per worker).
        return list(self._pool.map(fn, items, chunk_size=chunksize))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop_and_join()
            self._pool.terminate()


class MultiprocessingPool(Pool):
    name = "multiprocessing.Pool"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._context = multiprocessing.get_context("fork")
        self._pool: Any = None

    def start(self) -> None:
        self._pool = self._context.Pool(self.workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        return self._pool.apply_async(fn, args).get  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        # chunksize=None: Pool.map's own chunking (about four chunks per worker).
        return self._pool.map(fn, items, chunksize)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


class JoblibPool(Pool):
    """``joblib.Parallel(n_jobs=workers)`` as a batch job calls it: its default backend
    (loky's reusable executor, which outlives each call) and its default
    memory-mapping of large numpy arrays (``max_nbytes="1M"``: an array
    argument is dumped once per call to a file in ``/dev/shm`` that the
    workers map). joblib has no ``submit``: one call to ``Parallel`` runs a
    list of calls, and waits for them all.
    """

    name = "joblib"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        # By name: joblib is installed in .venv-bench only (the lint one has no stubs).
        self._joblib: Any = importlib.import_module("joblib")
        self._started = False

    def start(self) -> None:
        pass  # the reusable executor starts with the first call

    def _parallel(self, batch_size: int | str = "auto") -> Any:
        self._started = True
        return self._joblib.Parallel(n_jobs=self.workers, batch_size=batch_size)

    def run_all(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        delayed = self._joblib.delayed
        return list(self._parallel()(delayed(fn)(*args) for args in calls))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Waiter:
        (result,) = self.run_all(fn, [args])  # joblib waits for the call's results
        return lambda: result

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> list[Any]:
        delayed = self._joblib.delayed
        return list(self._parallel(chunksize or "auto")(delayed(fn)(item) for item in items))

    def close(self) -> None:
        if self._started:
            loky = importlib.import_module("joblib.externals.loky")
            loky.get_reusable_executor().shutdown(wait=True)


POOLS: dict[str, Callable[[int], Pool]] = {
    "pool_manager": PoolManagerPool,
    "pool_manager_loky": PoolManagerLokyPool,
    "pool_manager_native_none": PoolManagerNativeThreadsNonePool,
    "ppe": lambda workers: ExecutorPool(workers, "fork"),
    "ppe_spawn": lambda workers: ExecutorPool(workers, "spawn"),
    "loky": LokyPool,
    "pebble": PebblePool,
    "mpire": MpirePool,
    "mp_pool": MultiprocessingPool,
    "joblib": JoblibPool,
}


@contextmanager
def running(library: str, workers: int) -> Iterator[Pool]:
    """A started pool of ``library``, shut down on the way out, whatever happens."""
    if library not in POOLS:
        raise NotApplicable(f"no pool named {library!r}")
    pool = POOLS[library](workers)
    try:
        pool.start()
        yield pool
    finally:
        pool.close()


def _worker_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not is_tracker(child.cmdline()):
                children.append(child)
        except psutil.Error:
            continue
    return children


def warm(pool: Pool, workers: int) -> None:
    """Start every worker (several naps at once), then run a few no-ops."""
    pool.run_all(nap, [(0.1,)] * workers)
    pool.run_all(noop, [()] * 20)


# -- pool_manager's manager, whatever shape its lease takes -----------------


@contextmanager
def leased(manager: Any, key: str, send_size: int) -> Iterator[Any]:
    """The pool of ``key``, released on the way out.

    Works with each lease shape ``get_pool`` has had: a ``(pool, done)``
    pair, a pool with ``done()``, or a context manager.
    """
    if "send_size" in inspect.signature(manager.get_pool).parameters:
        lease = manager.get_pool(key, send_size=send_size)
    else:
        lease = manager.get_pool(key)
    if isinstance(lease, tuple):
        pool, done = lease
        try:
            yield pool
        finally:
            done()
    elif callable(getattr(lease, "done", None)):
        try:
            yield lease
        finally:
            lease.done()
    else:
        with lease as pool:
            yield pool


#: The manager's engine for each library that the keyed measures run: pool_manager's
#: default (the fork server) and its loky engine.
ENGINES: dict[str, str | None] = {"pool_manager": None, "pool_manager_loky": "loky"}


def new_manager(workers: int, library: str = "pool_manager") -> Any:
    """``WorkerPoolManager(workers, 600, 3600)`` on ``library``'s engine (`ENGINES`)."""
    if library not in ENGINES:
        raise NotApplicable("pool_manager only")
    from pool_manager import WorkerPoolManager

    engine = ENGINES[library]
    if engine is None:
        return WorkerPoolManager(workers, 600, 3600)
    return WorkerPoolManager(workers, 600, 3600, engine=engine)


def manager_info(manager: Any) -> dict[str, Any]:
    return {
        "max_total_workers": getattr(manager, "max_total_workers", "?"),
        "max_busy_workers": getattr(manager, "max_busy_workers", "?"),
        "engine": getattr(manager, "engine", "?"),
    }


# -- the measures -----------------------------------------------------------


def round_trip(library: str, p: dict[str, Any]) -> Result:
    """Median µs of one no-op's submit → result on a warm pool."""
    if library == "raw":
        return raw_round_trip(p)
    with running(library, p["workers"]) as pool:
        warm(pool, p["workers"])
        times = []
        for _ in range(p["calls"]):
            started = time.perf_counter()
            pool.submit(noop)()
            times.append(time.perf_counter() - started)
    return {"value": statistics.median(times) * 1e6, "calls": len(times)}


def submit_many(library: str, p: dict[str, Any]) -> Result:
    """No-op tasks per second, all submitted at once, then all waited for."""
    with running(library, p["workers"]) as pool:
        warm(pool, p["workers"])
        started = time.perf_counter()
        waits = [pool.submit(noop) for _ in range(p["tasks"])]
        for wait in waits:
            wait()
        elapsed = time.perf_counter() - started
    return {"value": p["tasks"] / elapsed, "seconds": elapsed}


def mapped(library: str, p: dict[str, Any]) -> Result:
    """Items per second through ``map`` (``chunksize`` None: the library's own)."""
    items, chunksize = p["items"], p["chunksize"]
    if chunksize is None and library in POOLS and not POOLS[library](0).auto_chunksize:
        raise NotApplicable("n/a (no automatic chunk size)")
    with running(library, p["workers"]) as pool:
        warm(pool, p["workers"])
        started = time.perf_counter()
        out = pool.map(ident, range(items), chunksize)
        elapsed = time.perf_counter() - started
    if len(out) != items or out[-1] != items - 1:
        raise AssertionError(f"map returned {len(out)} items, wanted {items}")
    return {"value": items / elapsed, "seconds": elapsed, "chunksize": chunksize}


def cold_start(library: str, p: dict[str, Any]) -> Result:
    """ms from constructing a pool (library imported) to its first result."""
    if library not in POOLS:
        raise NotApplicable(f"no pool named {library!r}")
    pool = POOLS[library](p["workers"])  # imports the library, outside the clock
    try:
        started = time.perf_counter()
        pool.start()
        pool.submit(noop)()
        elapsed = time.perf_counter() - started
    finally:
        pool.close()
    return {"value": elapsed * 1e3}


def cold_new_key(library: str, p: dict[str, Any]) -> Result:
    """ms from ``get_pool`` of a new key, in a manager that served another key, to a result."""
    manager = new_manager(p["workers"], library)
    try:
        with leased(manager, "first-key", p["workers"]) as pool:
            pool.submit(noop).result()
        started = time.perf_counter()
        with leased(manager, "new-key", p["workers"]) as pool:
            pool.submit(noop).result()
            elapsed = time.perf_counter() - started
    finally:
        manager.shutdown(wait=True)
    return {"value": elapsed * 1e3} | manager_info(manager)


def cached_key(library: str, p: dict[str, Any]) -> Result:
    """Median µs of ``get_pool`` of a cached, warm key + one no-op's result + release."""
    manager = new_manager(p["workers"], library)
    try:
        with leased(manager, "key", p["workers"]) as pool:
            for future in [pool.submit(nap, 0.1) for _ in range(p["workers"])]:
                future.result()
        times = []
        for _ in range(p["calls"]):
            started = time.perf_counter()
            with leased(manager, "key", p["workers"]) as pool:
                pool.submit(noop).result()
            times.append(time.perf_counter() - started)
    finally:
        manager.shutdown(wait=True)
    return {"value": statistics.median(times) * 1e6, "calls": len(times)}


def echo_payload(library: str, p: dict[str, Any]) -> Result:
    """MB/s: a payload's size over its round trip to a worker and back (median)."""
    if library == "raw":
        return raw_echo(p)
    data = os.urandom(p["bytes"])
    with running(library, p["workers"]) as pool:
        warm(pool, p["workers"])
        pool.submit(echo, data)()
        times = []
        for _ in range(p["echoes"]):
            started = time.perf_counter()
            back = pool.submit(echo, data)()
            times.append(time.perf_counter() - started)
            if len(back) != len(data):
                raise AssertionError("echo returned a different payload")
    return {"value": p["bytes"] / 1e6 / statistics.median(times)}


# -- large data, as batch jobs pass it (issue 14) -----------------------------


def big_array(library: str, p: dict[str, Any]) -> Result:
    """Seconds for ``tasks`` tasks each given one large numpy array; the memory it took.

    The pool is warm before the array (``mb`` MB of float64) is made, so no
    forked worker shares its pages. Then every task is submitted with the
    array as its argument (joblib: one ``Parallel`` call) and all are waited
    for; each returns `strided_sum`, checked against the parent's own.
    ``pool_manager_shared`` gives the array to a pool as its ``shared_data``
    instead (`_run_with_shared_data`); ``pool_manager_shared_array`` makes it
    with ``pool_manager.shared_array`` (filled the same way: every page
    written, before the timing) and submits it as pool_manager does an
    ordinary one, which then sends its memory as it is; ``pool_manager_shared_both``
    gives a pool such an array as its ``shared_data``. ``memory_mb``: the parent's peak
    growth over its baseline (`ParentPeak`), or with ``whole_job`` the peak
    of the whole process tree (`JobPeak`, the parent's growth kept beside it).
    """
    try:
        import numpy
    except ImportError:
        raise NotApplicable("numpy is not installed") from None
    workers, tasks = p["workers"], p["tasks"]
    shared = library in ("pool_manager_shared", "pool_manager_shared_both")
    in_shared_memory = library in ("pool_manager_shared_array", "pool_manager_shared_both")
    pool_of = "pool_manager" if library == "pool_manager_shared_array" else library
    with _warm_fork_server() if shared else running(pool_of, workers) as pool:
        if pool is not None:
            warm(pool, workers)
        count = int(p["mb"] * 1e6) // 8
        if in_shared_memory:
            from pool_manager import shared_array

            array = shared_array(count)
            array[:] = 1.0  # written: every page resident
        else:
            array = numpy.ones(count)  # written: every page resident
        expected = strided_sum(array)
        with JobPeak() if p.get("whole_job") else nullcontext() as job, ParentPeak() as parent:
            started = time.perf_counter()
            if pool is None:
                results, finished = _run_with_shared_data(array, workers, tasks)
            else:
                results = pool.run_all(strided_sum, [(array,)] * tasks)
                finished = time.perf_counter()
            elapsed = finished - started
    if results != [expected] * tasks:
        raise AssertionError(f"the tasks returned {results[:3]}..., wanted {expected}")
    memory = job.peak if job is not None else parent.growth
    return {
        "value": elapsed,
        "memory_mb": memory / 1e6,
        "array_mb": array.nbytes / 1e6,
        "tasks": tasks,
        **parent.details(),
        **(job.details() if job is not None else {}),
    }


@contextmanager
def _warm_fork_server() -> Iterator[None]:
    """pool_manager's fork server started and held (by a manager with no pool yet,
    as an application's would hold it), with no worker: the warm state of
    `_run_with_shared_data`, whose pool is built with its data."""
    from pool_manager import WorkerPoolManager

    manager = WorkerPoolManager(1, 600, 3600, memory_sample_interval=None, handle_signals=False)
    try:
        yield None
    finally:
        manager.shutdown(wait=True)


def _run_with_shared_data(array: Any, workers: int, tasks: int) -> tuple[list[float], float]:
    """``pool_manager_shared``: a pool built with ``shared_data=array`` (its pickling
    and its workers' starts are timed too: its workers are forked from a warm
    fork server, where the other libraries' pools are warm), and ``tasks``
    tasks that read it (`strided_sum_shared`). Returns their results, and the
    time the last came (before the pool's shutdown, which the other pools
    make untimed)."""
    from pool_manager import BaseWorkerPool

    pool = BaseWorkerPool(workers, shared_data=array)
    try:
        futures = [pool.submit(strided_sum_shared) for _ in range(tasks)]
        results = [future.result() for future in futures]
        return results, time.perf_counter()
    finally:
        pool.shutdown(wait=True)


#: The batch job's script that `big_global` runs as ``__main__``.
MAIN_SCRIPT = Path(__file__).resolve().parent / "suite_main_script.py"


def big_global(library: str, p: dict[str, Any]) -> Result:
    """A main script's large global, read by a main-script function in many tasks.

    Runs `MAIN_SCRIPT` as a program of its own (``python path/to/script``,
    this interpreter), so that the function and the global really are
    ``__main__``'s: the script builds the global at its top, as a batch job
    loads its data, and maps the function over the tasks; see that file.
    """
    if library not in POOLS:
        raise NotApplicable(f"no pool named {library!r}")
    with NamedTemporaryFile("r", suffix=".json", prefix="suite-main-") as result:
        command = [sys.executable, str(MAIN_SCRIPT), library, "--params", json.dumps(p)]
        env = os.environ | {"SUITE_GLOBAL_BYTES": str(int(p["mb"] * 1e6))}
        done = subprocess.run(
            [*command, "--result", result.name], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise AssertionError(f"the main script exited {done.returncode}: {tail}")
        sample: Result = json.loads(Path(result.name).read_text())
    return sample


def efficiency(library: str, p: dict[str, Any]) -> Result:
    """% of the ideal: (tasks × one task's time / workers) / wall time.

    One task's time is measured in the pool's own workers (the task run
    alone, timed inside the worker), five times just before the parallel
    run and five times just after, and their mean is used: the work's cost
    on this machine now and in those processes, rather than at calibration
    (a shared virtual machine drifts, one run of the loop can differ from
    the next by a fifth, and the same loop runs a few percent faster or
    slower in another interpreter). The jitter that remains can put a sample
    above 100%. For the raw limit (forks of this process) it is timed here.
    ``here_value`` is the same figure with the task timed in this process.

    Also ``cpu_value``: the CPU time the tasks got, measured in the workers,
    over workers × wall time. Jitter of the host slows a task's CPU time and
    the wall time alike, so this one shows the time workers spent without a
    task, or sharing their CPU with the pool's own threads.
    """
    iterations, tasks, workers = p["iterations"], p["tasks"], p["workers"]
    singles = [timed_burn(iterations) for _ in range(5)]
    in_workers: list[float] = []  # one task alone, timed inside the pool's workers
    if library == "raw":
        wall, cpu = raw_parallel_burn(iterations, tasks, workers)
    else:
        with running(library, workers) as pool:
            warm(pool, workers)
            in_workers += [pool.submit(timed_burn, iterations)() for _ in range(5)]
            started = time.perf_counter()
            waits = [pool.submit(cpu_burn, iterations) for _ in range(tasks)]
            cpu = sum(wait() for wait in waits)
            wall = time.perf_counter() - started
            in_workers += [pool.submit(timed_burn, iterations)() for _ in range(5)]
    singles += [timed_burn(iterations) for _ in range(5)]
    single_here = statistics.mean(singles)
    # The loop's speed differs from one process to another by a few percent
    # (an interpreter started apart, as a spawn or fork-server worker is, is
    # not laid out like this one): time one task where the tasks run.
    single = statistics.mean(in_workers) if in_workers else single_here
    return {
        "value": 100 * tasks * single / workers / wall,
        "cpu_value": 100 * cpu / workers / wall,
        "single_task_s": single,
        "single_task_samples_s": in_workers or singles,
        "single_task_here_s": single_here,
        "here_value": 100 * tasks * single_here / workers / wall,
        "tasks_cpu_s": cpu,
        "wall_s": wall,
        "nominal_value": 100 * tasks * p["calibrated_s"] / workers / wall,
    }


def idle_uss(library: str, p: dict[str, Any]) -> Result:
    """Median USS (MB) of a pool's idle workers, after each ran a task."""
    with running(library, p["workers"]) as pool:
        warm(pool, p["workers"])
        time.sleep(p["settle"])
        sizes = []
        for pid in pool.worker_pids():
            try:
                sizes.append(psutil.Process(pid).memory_full_info().uss / 1e6)
            except psutil.Error:
                continue
    if not sizes:
        raise AssertionError("no live worker found")
    return {"value": statistics.median(sizes), "workers_seen": len(sizes)}


def blas_matmul(library: str, p: dict[str, Any]) -> Result:
    """Seconds for ``tasks_per_worker`` × workers tasks of `matmul` (numpy's BLAS)
    submitted at once, every worker busy: each worker's BLAS threads on top of
    the others' (``native_threads``).

    numpy is imported here first, as a batch job's script does (a fork-started
    peer's workers inherit its BLAS as this process loaded it); each worker
    imports it before the timing (`blas_threads_after`, which reports the
    threads its BLAS runs), and runs one small product.
    """
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise NotApplicable("numpy is not installed") from None
    workers = p["workers"]
    with running(library, workers) as pool:
        warm(pool, workers)
        threads = pool.run_all(blas_threads_after, [(0.2,)] * workers)
        pool.run_all(matmul, [(p["size"], 1, seed) for seed in range(workers)])
        calls = [
            (p["size"], p["products"], seed) for seed in range(workers * p["tasks_per_worker"])
        ]
        started = time.perf_counter()
        results = pool.run_all(matmul, calls)
        elapsed = time.perf_counter() - started
    if len(results) != len(calls):
        raise AssertionError(f"{len(results)} results for {len(calls)} tasks")
    products = len(calls) * p["products"]
    return {
        "value": elapsed,
        "blas_threads": threads,  # (each worker's libraries, as threadpoolctl sees them)
        "gflops": products * 2 * p["size"] ** 3 / elapsed / 1e9,
        "products": products,
    }


# -- the keyed-batches workload (goal 1) --------------------------------------


def keyed_batches(library: str, p: dict[str, Any]) -> Result:
    """Seconds for the batches: each takes its key's pool and runs small CPU tasks.

    ``pool_size`` (if given): each key's cap, the shared executor keeping
    ``workers``; else both are ``workers``.
    """
    workers, tasks, iterations = p["workers"], p["tasks"], p["iterations_1ms"]
    size = p.get("pool_size", workers)
    batches, extra = p["batches"], {}

    def run(batch: Callable[[str], None], count: int) -> float:
        keys = [f"tenant-{i % p['keys']}" for i in range(count)]
        started = time.perf_counter()
        with ThreadPoolExecutor(p["threads"]) as callers:
            list(callers.map(batch, keys))
        return time.perf_counter() - started

    if library == "pool_manager":
        manager = new_manager(size)
        extra = manager_info(manager)
        try:

            def keyed(key: str) -> None:
                with leased(manager, key, size) as pool:
                    for future in [pool.submit(burn, iterations) for _ in range(tasks)]:
                        future.result()

            seconds = run(keyed, batches)
        finally:
            manager.shutdown(wait=True)
    elif library == "ppe":
        with running("ppe", workers) as shared:

            def one_pool(key: str) -> None:
                for wait in [shared.submit(burn, iterations) for _ in range(tasks)]:
                    wait()

            seconds = run(one_pool, batches)
        extra = {"runner": "one shared ProcessPoolExecutor (fork) for all keys"}
    elif library == "ppe_spawn":

        def fresh(key: str) -> None:
            with running("ppe_spawn", workers) as executor:
                for wait in [executor.submit(burn, iterations) for _ in range(tasks)]:
                    wait()

        count = p["per_batch_batches"]
        seconds = run(fresh, count) * batches / count
        extra = {
            "runner": "a spawn-started ProcessPoolExecutor per batch",
            "batches_run": count,
            "scaled_to": batches,
        }
    else:
        raise NotApplicable("not run for this library")
    return {"value": seconds} | extra


# -- the raw limits: two processes and a pipe --------------------------------


def _pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _read_exactly(fd: int, view: memoryview) -> None:
    with open(fd, "rb", buffering=0, closefd=False) as reader:
        got = 0
        while got < len(view):
            n = reader.readinto(view[got:])
            if not n:
                raise EOFError("pipe closed")
            got += n


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _forked(child: Callable[[], None]) -> int:
    """Fork a child that runs ``child`` and exits at once, whatever happens."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def raw_round_trip(p: dict[str, Any]) -> Result:
    """One byte to another process (on another core) and back, through two pipes."""
    child_read, parent_write = os.pipe()
    parent_read, child_write = os.pipe()
    calls = p["calls"]

    def child() -> None:
        _pin(1)
        for _ in range(calls + 100):
            os.read(child_read, 1)
            os.write(child_write, b"x")

    pid = _forked(child)
    try:
        _pin(0)
        times = []
        for i in range(calls + 100):
            started = time.perf_counter()
            os.write(parent_write, b"x")
            os.read(parent_read, 1)
            if i >= 100:
                times.append(time.perf_counter() - started)
    finally:
        _reap(pid)
        for fd in (child_read, parent_write, parent_read, child_write):
            os.close(fd)
    return {"value": statistics.median(times) * 1e6, "calls": calls, "cross_core": True}


def raw_echo(p: dict[str, Any]) -> Result:
    """A payload through a pipe to another process and back through another pipe."""
    size, echoes = p["bytes"], p["echoes"]
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()

    def child() -> None:
        _pin(1)
        buffer = memoryview(bytearray(size))
        for _ in range(echoes + 1):
            _read_exactly(down_r, buffer)
            _write_all(up_w, buffer)

    pid = _forked(child)
    try:
        _pin(0)
        data = os.urandom(size)
        back = memoryview(bytearray(size))
        times = []
        for i in range(echoes + 1):
            started = time.perf_counter()
            _write_all(down_w, data)
            _read_exactly(up_r, back)
            if i:
                times.append(time.perf_counter() - started)
    finally:
        _reap(pid)
        for fd in (down_r, down_w, up_r, up_w):
            os.close(fd)
    return {"value": size / 1e6 / statistics.median(times)}


def raw_parallel_burn(iterations: int, tasks: int, workers: int) -> tuple[float, float]:
    """Wall seconds for ``workers`` forked processes to run ``tasks`` burns, and their CPU.

    Each process takes the next task as it finishes one (a byte from a pipe
    holding one byte per task), as a pool's workers do, so that one slower
    process does not leave the other idle at the end.
    """
    tasks_r, tasks_w = os.pipe()
    pids = []

    def child() -> None:
        os.close(tasks_w)
        while os.read(tasks_r, 1):
            burn(iterations)

    cpu = 0.0
    try:
        for _ in range(workers):
            pids.append(_forked(child))
        time.sleep(0.05)
        started = time.perf_counter()
        os.write(tasks_w, b"x" * tasks)
        os.close(tasks_w)
        tasks_w = -1
        for pid in pids[:]:
            _, _, usage = os.wait4(pid, 0)
            pids.remove(pid)
            cpu += usage.ru_utime + usage.ru_stime
        wall = time.perf_counter() - started
    finally:
        for pid in pids:
            _reap(pid)
        os.close(tasks_r)
        if tasks_w >= 0:
            os.close(tasks_w)
    return wall, cpu


MEASURES: dict[str, Callable[[str, dict[str, Any]], Result]] = {
    "round_trip": round_trip,
    "submit_many": submit_many,
    "map": mapped,
    "cold_start": cold_start,
    "cold_new_key": cold_new_key,
    "cached_key": cached_key,
    "echo": echo_payload,
    "efficiency": efficiency,
    "idle_uss": idle_uss,
    "keyed_batches": keyed_batches,
    "keyed_batches_many": keyed_batches,
    "big_array": big_array,
    "big_global": big_global,
    "blas_matmul": blas_matmul,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=sorted(MEASURES))
    parser.add_argument("library")
    parser.add_argument("--params", type=json.loads, default={})
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    try:
        result = MEASURES[args.measure](args.library, args.params)
    except NotApplicable as why:
        result = {"value": None, "note": str(why)}
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
