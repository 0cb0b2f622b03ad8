"""One I/O loop, one worker starter and a few callback threads serve every pool
of the process; no fork-server round trip happens under a pool's lock; user
callbacks never run on the loop or the starter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, wait
from pathlib import Path
from typing import Any

import pytest

from pool_manager import BaseWorkerPool, _process, _threads

from .helpers import poll, square, wait_then_square


def _library_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pool_manager-")]


@pytest.mark.timeout(120)
def test_forty_pools_with_busy_workers_add_a_few_threads_not_one_each(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    before = len(_library_threads())
    pools = [BaseWorkerPool(1, idle_timeout=None) for _ in range(40)]
    try:
        started = [tmp_path / f"started-{i}" for i in range(40)]
        futures = [
            pool.submit(touch_then_wait, str(mark), str(gate)) for pool, mark in zip(pools, started)
        ]
        assert poll(lambda: all(mark.exists() for mark in started), timeout=90)
        threads = _library_threads()
        assert len(threads) - before <= 8, threads
        assert threads.count("pool_manager-io") == 1
        gate.touch()
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(40)]
    finally:
        gate.touch()
        for pool in pools:
            pool.shutdown()


def touch_then_wait(mark: str, gate: str) -> int:
    import os

    index = int(mark.rsplit("-", 1)[1])
    open(mark, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.005)
    return index * index


@pytest.mark.timeout(60)
def test_a_done_callback_that_blocks_holds_up_only_its_own_pools_callbacks() -> None:
    release = threading.Event()
    seen: list[int] = []
    with BaseWorkerPool(1) as stuck_pool, BaseWorkerPool(1) as other_pool:
        stuck = stuck_pool.submit(square, 2)
        stuck.add_done_callback(lambda _: release.wait(60))
        assert stuck.result(timeout=30) == 4
        # Its pool's results still arrive (they settle on the I/O loop)...
        assert stuck_pool.submit(square, 3).result(timeout=30) == 9
        # ... and another pool's callbacks still run.
        for i in range(5):
            other_pool.submit(square, i).add_done_callback(lambda f: seen.append(f.result()))
        assert poll(lambda: len(seen) == 5, timeout=30), seen
        assert sorted(seen) == [0, 1, 4, 9, 16]
        release.set()


@pytest.mark.timeout(60)
def test_a_pools_done_callbacks_run_one_at_a_time_off_the_service_threads() -> None:
    order: list[int] = []
    threads: set[str] = set()
    running = [0]
    overlapped: list[bool] = []

    def record(future: Future[int]) -> None:
        running[0] += 1
        overlapped.append(running[0] > 1)
        threads.add(threading.current_thread().name)
        time.sleep(0.001)
        order.append(future.result())
        running[0] -= 1

    with BaseWorkerPool(1) as pool:
        futures = [pool.submit(square, i) for i in range(50)]
        for future in futures:
            future.add_done_callback(record)
        wait(futures, timeout=30)
        assert poll(lambda: len(order) == 50, timeout=30)
    assert not any(overlapped)
    # One worker: the results come in submission order, and so do the callbacks.
    assert order == [i * i for i in range(50)]
    assert "pool_manager-io" not in threads
    assert "pool_manager-starter" not in threads


@pytest.mark.timeout(60)
def test_a_worker_start_holds_no_lock_of_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the fork server is slow to answer, the pool still answers."""
    entered = threading.Event()
    release = threading.Event()
    original: Callable[[_process.ForkServer], Any] = _process.ForkServer.start_worker

    def slow_start(server: _process.ForkServer) -> Any:
        entered.set()
        release.wait(30)
        return original(server)

    monkeypatch.setattr(_process.ForkServer, "start_worker", slow_start)
    with BaseWorkerPool(2) as pool:
        first = pool.submit(square, 5)  # returns at once: the start is the starter's
        assert entered.wait(30)
        began = time.monotonic()
        counts = pool.task_counts()  # (takes the pool's lock)
        second = pool.submit(square, 6)
        assert time.monotonic() - began < 5  # (not the 30 s the start may take)
        assert counts["queued"] == 1 and not first.done()
        release.set()
        assert first.result(timeout=30) == 25
        assert second.result(timeout=30) == 36


def test_settle_quietly_wakes_waiters_and_hands_back_the_callbacks() -> None:
    future = _threads.GuardedCallbacksFuture()
    calls: list[object] = []
    future.add_done_callback(calls.append)
    waiter = threading.Thread(target=lambda: calls.append(("result", future.result(timeout=30))))
    waiter.start()
    callbacks = future.settle_quietly(True, 7)
    waiter.join(30)
    assert calls == [("result", 7)]  # the waiter woke; the callback did not run
    assert len(callbacks) == 1
    _threads.run_callbacks([(future, callbacks)])
    assert calls[-1] is future
    with pytest.raises(InvalidStateError):
        future.settle_quietly(False, ValueError())
    failed = _threads.GuardedCallbacksFuture()
    assert failed.settle_quietly(False, KeyError("x")) == []
    assert isinstance(failed.exception(timeout=0), KeyError)


@pytest.mark.timeout(60)
def test_the_callback_runner_starts_another_thread_when_all_are_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_threads.CallbackRunner, "STUCK", 0.05)
    monkeypatch.setattr(_threads.CallbackRunner, "IDLE_EXIT", 0.1)
    runner = _threads.CallbackRunner()
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck() -> None:
        started.release()
        release.wait(30)

    strands = [_threads.Strand() for _ in range(runner.THREADS)]
    try:
        for strand in strands:
            runner.run(strand, stuck)
        for _ in strands:
            assert started.acquire(timeout=30)
        time.sleep(0.1)  # (each is stuck for longer than STUCK now)
        ran = threading.Event()
        runner.run(_threads.Strand(), ran.set)
        assert ran.wait(30)
        # A strand's later job waits for its earlier one.
        after = threading.Event()
        runner.run(strands[0], after.set)
        assert not after.wait(0.2)
    finally:
        release.set()
    assert after.wait(30)
    assert poll(lambda: runner._threads == 0, timeout=30)


@pytest.mark.timeout(60)
def test_disposing_from_a_done_callback_with_wait_returns_once_the_pool_is_done(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    pool = BaseWorkerPool(1)
    disposed = threading.Event()
    later = pool.submit(wait_then_square, str(gate), 3)

    def dispose(_: Future[int]) -> None:
        pool.dispose(wait=True)  # on a callback thread: waits for `later`
        disposed.set()

    pool.submit(square, 2).add_done_callback(dispose)
    time.sleep(0.2)
    assert not disposed.is_set()
    gate.touch()
    assert disposed.wait(30)
    assert later.result(timeout=0) == 9
    assert pool.worker_pids() == []


def test_deferred_work_runs_once_at_the_end_of_a_service_threads_round() -> None:
    calls: list[str] = []

    def work() -> None:
        calls.append(threading.current_thread().name)

    _threads.defer(work)  # (not a service thread: now)
    assert calls == ["MainThread"]

    def service_round() -> None:
        _threads.mark_library_thread(service=True)
        for _ in range(5):
            _threads.defer(work)
        calls.append("before the end of the round")
        _threads.run_deferred()

    thread = threading.Thread(target=service_round, name="service")
    thread.start()
    thread.join(30)
    assert calls == ["MainThread", "before the end of the round", "service"]
