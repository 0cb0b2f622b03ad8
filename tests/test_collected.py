"""A pool or manager dropped without ``shutdown()`` is collected and lets go of
its threads, workers and fork server, as a ``ProcessPoolExecutor`` does.

Every case keeps its workers alive on purpose (no idle timeout), so that
only the collection can end them.
"""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

import psutil

from pool_manager import BaseWorkerPool, WorkerPoolManager, _process

from .helpers import poll, square, wait_then_square


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # (also while it is asked: it may end at any moment)
        return False


def _gone(pids: list[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


def _collected(ref: weakref.ReferenceType[object]) -> bool:
    gc.collect()
    return ref() is None


def _library_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pool_manager-")]


def test_an_idle_pool_dropped_without_shutdown_ends_its_workers_and_thread() -> None:
    threads_before = _library_threads()
    pool = BaseWorkerPool(2, idle_timeout=None)
    assert pool.submit(square, 3).result(timeout=60) == 9
    pids = pool.worker_pids()
    assert pids and "pool_manager-io" in _library_threads()
    ref = weakref.ref(pool)
    del pool
    # (Its I/O thread may still hold it for a moment, settling that task.)
    assert poll(lambda: _collected(ref), timeout=30)
    assert poll(lambda: _gone(pids), timeout=30), "the workers outlived their pool"
    assert poll(lambda: _library_threads() == threads_before, timeout=30), _library_threads()


def test_a_pool_dropped_with_a_running_task_finishes_it_then_ends(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = BaseWorkerPool(1, idle_timeout=None)
    done: list[int] = []
    future = pool.submit(wait_then_square, str(gate), 4)
    future.add_done_callback(lambda f: done.append(f.result()))
    pids = pool.worker_pids()
    ref = weakref.ref(pool)
    del pool, future
    gc.collect()
    assert ref() is not None  # held while it has work
    gate.touch()
    assert poll(lambda: done == [16], timeout=60), "the task's callback never ran"
    assert poll(lambda: _collected(ref), timeout=30)
    assert poll(lambda: _gone(pids), timeout=30)


def test_a_manager_dropped_without_shutdown_ends_its_supervisor_pools_and_fork_server() -> None:
    holders_before = _process._holders
    threads_before = _library_threads()
    manager = WorkerPoolManager(
        pool_size=2, stale_pool_expiration=3600, max_pool_lifetime=7200, worker_idle_timeout=None
    )
    with manager.lease("k") as pool:
        assert pool.submit(square, 5).result(timeout=60) == 25
        pids = pool.worker_pids()
    server = _process._server
    assert server is not None and _process._holders > holders_before
    ref = weakref.ref(manager)
    del manager, pool
    assert poll(lambda: _collected(ref), timeout=30)
    assert poll(lambda: _library_threads() == threads_before, timeout=30), _library_threads()
    assert poll(lambda: _gone(pids), timeout=30)
    assert poll(lambda: _process._holders == holders_before, timeout=30)


def test_many_forgotten_managers_leave_nothing_behind() -> None:
    # As a request handler that forgets shutdown() does, 20 times over.
    threads_before = _library_threads()
    results: list[Future[int]] = []
    for i in range(20):
        manager = WorkerPoolManager(pool_size=1, stale_pool_expiration=60, max_pool_lifetime=600)
        with manager.lease("k") as pool:
            results.append(pool.submit(square, i))
            results[-1].result(timeout=60)
    del manager, pool
    gc.collect()
    assert [f.result() for f in results] == [i * i for i in range(20)]
    assert poll(lambda: gc.collect() >= 0 and _library_threads() == threads_before, timeout=60)


def test_a_pool_dropped_after_work_submitted_to_its_idle_workers_still_does_it(
    tmp_path: Path,
) -> None:
    # The I/O thread of an idle pool holds it weakly as it waits, and a
    # submit whose message goes out at once does not wake it: the pool must
    # be kept by its unfinished work, not by what that thread last saw.
    pool = BaseWorkerPool(1, idle_timeout=None)
    assert pool.submit(square, 2).result(timeout=60) == 4
    gate = tmp_path / "gate"
    done: list[int] = []
    pool.submit(wait_then_square, str(gate), 6).add_done_callback(lambda f: done.append(f.result()))
    pids = pool.worker_pids()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is not None
    gate.touch()
    assert poll(lambda: done == [36], timeout=60), "the task was dropped with its pool"
    assert poll(lambda: _collected(ref), timeout=30)
    assert poll(lambda: _gone(pids), timeout=30)
