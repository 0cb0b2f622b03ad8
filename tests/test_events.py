"""Events and logs: on_event sees each pool's and each worker's life."""

from __future__ import annotations

import logging
import threading

import pytest

import pool_manager
from pool_manager import BaseWorkerPool, PoolEvent, WorkerPoolManager

from .helpers import FakeClock, exit_process, getpid, poll, square


class Recorder:
    def __init__(self) -> None:
        self.events: list[PoolEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: PoolEvent) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self, key: object = None) -> list[str]:
        with self._lock:
            return [e.kind for e in self.events if key is None or e.key == key]


def test_the_package_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("pool_manager").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert pool_manager.PoolEvent is PoolEvent


def test_pool_lifecycle_events_reach_on_event_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    recorder = Recorder()
    with (
        caplog.at_level(logging.INFO, logger="pool_manager"),
        WorkerPoolManager(
            1, 60, 600, clock=clock, on_event=recorder, memory_sample_interval=None
        ) as manager,
    ):
        manager.get_pool("stale")[1]()
        _, done_old = manager.get_pool("old")
        clock.advance(60)
        manager.sweep()
        clock.advance(600)
        manager.sweep()
        done_old()
        manager.sweep()
        assert poll(lambda: recorder.kinds("old")[-1:] == ["pool_disposed"], timeout=30)
    assert recorder.kinds("stale") == ["pool_built", "pool_expired", "pool_disposed"]
    assert recorder.kinds("old") == ["pool_built", "pool_retired", "pool_disposed"]
    expired = [e for e in recorder.events if e.kind == "pool_expired"][0]
    assert expired.message == "pool for key 'stale' expired after 60.0s unused"
    assert expired.at == 1060.0
    assert "pool built for key 'old' (max_size=1)" in caplog.text
    assert "pool for key 'old' retired after 660.0s" in caplog.text


def test_a_lost_worker_is_an_event_with_its_pid_and_how_it_died() -> None:
    recorder = Recorder()
    with WorkerPoolManager(1, 60, 600, on_event=recorder) as manager, manager.lease("a") as pool:
        crashed = pool.submit(exit_process, 3)
        error = crashed.exception(timeout=60)
        assert poll(lambda: "worker_lost" in recorder.kinds("a"), timeout=30)
    lost = [e for e in recorder.events if e.kind == "worker_lost"][0]
    assert lost.pid == error.pid  # type: ignore[union-attr]
    assert lost.reason == "exit code 3"


def test_workers_started_and_recycled_are_seen_at_the_memory_samples() -> None:
    clock = FakeClock()
    recorder = Recorder()
    with WorkerPoolManager(
        1,
        600,
        3600,
        clock=clock,
        on_event=recorder,
        memory_sample_interval=5,
        max_tasks_per_worker=2,
    ) as manager:
        with manager.lease("a") as pool:
            first = pool.submit(getpid).result(timeout=60)
        clock.advance(5)
        manager.sweep()  # the worker waits for its second task: seen alive
        assert poll(lambda: "worker_started" in recorder.kinds("a"), timeout=30)
        with manager.lease("a") as pool:
            assert pool.submit(getpid).result(timeout=60) == first  # its last task
        assert poll(lambda: first not in pool.worker_pids(), timeout=30)
        clock.advance(5)
        manager.sweep()
        assert poll(lambda: "worker_recycled" in recorder.kinds("a"), timeout=30)
    recycled = [e for e in recorder.events if e.kind == "worker_recycled"]
    assert recycled[0].pid == first and recycled[0].reason == "max_tasks_per_worker"


def test_a_failing_on_event_callback_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: PoolEvent) -> None:
        raise RuntimeError("metrics backend down")

    with WorkerPoolManager(1, 60, 600, on_event=broken) as manager:
        with manager.lease("a") as pool:
            assert pool.submit(square, 3).result(timeout=60) == 9
        assert "a" in manager
    assert "the on_event callback failed for pool_built" in caplog.text
    with pytest.raises(TypeError, match="on_event"):
        WorkerPoolManager(1, 60, 600, on_event="not callable")  # type: ignore[arg-type]


def test_a_pool_disposed_by_a_sweep_and_a_shutdown_at_once_is_reported_once() -> None:
    clock = FakeClock()
    recorder = Recorder()
    disposing, gate = threading.Event(), threading.Event()
    calls: list[int] = []

    class SlowToDispose(BaseWorkerPool):
        def dispose(self, wait: bool = True) -> None:
            calls.append(1)
            disposing.set()
            assert gate.wait(30)
            super().dispose(wait)

    manager = WorkerPoolManager(
        1, 60, 600, clock=clock, on_event=recorder, memory_sample_interval=None
    )
    try:
        manager.get_pool_with_factory("slow", 1, SlowToDispose)[1]()
        clock.advance(60)
        # This sweep expires and disposes it, unless the supervisor's own sweep
        # (woken by the release) got there first: either way a sweep is
        # disposing it, and shutdown must not wait for that sweep to signal it.
        sweeping = threading.Thread(target=manager.sweep)
        sweeping.start()
        assert disposing.wait(30)
        closing = threading.Thread(target=manager.shutdown)  # waits for that pool too
        closing.start()
        assert poll(lambda: len(calls) == 2, timeout=30)
    finally:
        gate.set()
        for thread in (sweeping, closing):
            thread.join(30)
        manager.shutdown()
    assert recorder.kinds("slow") == ["pool_built", "pool_expired", "pool_disposed"]
