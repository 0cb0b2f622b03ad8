"""Callbacks never stall nor end a library thread, and every future settles.

Done-callbacks and worker-event callbacks run on the library's callback
threads (idle callbacks, a manager's, on the I/O loop); the manager's
``on_event`` there, on the supervisor or on the caller's thread. A
``submit`` made there is never held by backpressure (it would wait for
room only that thread can make), and whatever a callback
raises (``SystemExit`` included) is logged while the thread goes on. Real
worker processes; what would hang on a regression fails by a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from pool_manager import (
    BaseWorkerPool,
    PoolEvent,
    WorkerLostError,
    WorkerPoolBrokenError,
    WorkerPoolManager,
)
from pool_manager.supervisor import Supervisor

from .helpers import (
    FakeClock,
    add,
    exit_process,
    poll,
    square,
    touch_and_wait,
    wait_for_path,
)

pytestmark = pytest.mark.timeout(90)

#: What a buggy callback may raise: an Exception, and two that Future lets escape.
RAISED = [RuntimeError("a bug in a listener"), SystemExit(3), KeyboardInterrupt()]
RAISED_IDS = ["Exception", "SystemExit", "KeyboardInterrupt"]


def raising(error: BaseException) -> Callable[..., None]:
    def callback(*args: object) -> None:
        raise error

    return callback


# -- a submit from a callback is never held by backpressure --------------------


def test_a_done_callback_can_submit_to_a_full_pool(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(1, max_pending=0) as pool:
        first = pool.submit(wait_for_path, str(gate))
        follow_ups: list[Future[int]] = []

        def chain(_: Future[str]) -> None:
            # On a callback thread. The first follow-up fills the pool (one
            # worker, max_pending=0); the others are admitted beyond it.
            for x in range(3):
                follow_ups.append(pool.submit(square, x))

        first.add_done_callback(chain)
        gate.touch()
        assert poll(lambda: len(follow_ups) == 3, timeout=30)
        assert [f.result(timeout=30) for f in follow_ups] == [0, 1, 4]
        assert pool.task_counts()["completed"] == 4


def test_chaining_work_from_done_callbacks_on_a_managers_pool_completes() -> None:
    # A manager's pools have backpressure (max_pending=pool_size): the main
    # thread keeps the pool full while each callback submits a follow-up.
    count = 300
    with WorkerPoolManager(2, 60, 600) as manager, manager.lease("a", send_size=2) as pool:
        follow_ups: list[Future[int]] = []

        def chain(future: Future[int]) -> None:
            follow_ups.append(pool.submit(square, future.result()))

        firsts = []
        for i in range(count):
            first = pool.submit(add, i)
            first.add_done_callback(chain)
            firsts.append(first)
        assert [f.result(timeout=60) for f in firsts] == list(range(count))
        assert poll(lambda: len(follow_ups) == count, timeout=60)
        results = sorted(f.result(timeout=60) for f in follow_ups)
        assert results == [i * i for i in range(count)]


def test_a_submit_on_the_supervisor_thread_is_not_held_by_backpressure(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(1, max_pending=0) as pool:
        blocker = pool.submit(wait_for_path, str(gate))  # the pool is full until the gate opens
        submitted: list[Future[int]] = []

        def sweep() -> None:
            submitted.append(pool.submit(square, 3))

        supervisor = Supervisor(sweep, time.monotonic, name="pool_manager-supervisor-test")
        supervisor.start()
        try:
            supervisor.wake()
            assert poll(lambda: submitted, timeout=30), "the supervisor's submit was held"
            assert not blocker.done()
        finally:
            gate.touch()
            supervisor.stop()
        assert submitted[0].result(timeout=30) == 9


# -- a callback that raises ends nothing ---------------------------------------


@pytest.mark.parametrize("error", RAISED, ids=RAISED_IDS)
def test_an_idle_callback_that_raises_never_stops_the_pool(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def buggy() -> None:
        calls.append("buggy")
        raise error

    with BaseWorkerPool(1) as pool:
        pool.add_idle_callback(buggy)
        pool.add_idle_callback(lambda: calls.append("next"))
        assert pool.submit(square, 3).result(timeout=30) == 9
        assert pool.submit(square, 4).result(timeout=30) == 16
    # The idle callbacks run before the last future settles.
    assert calls == ["buggy", "next", "buggy", "next"]
    assert "an idle callback failed" in caplog.text


@pytest.mark.parametrize("error", RAISED, ids=RAISED_IDS)
def test_a_done_callback_that_raises_never_stops_the_pool(
    error: BaseException, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    seen: list[str] = []
    with BaseWorkerPool(1) as pool:
        first = pool.submit(wait_for_path, str(gate))
        first.add_done_callback(raising(error))
        first.add_done_callback(lambda future: seen.append(future.result()))
        queued = pool.submit(square, 5)
        gate.touch()
        assert first.result(timeout=30) == str(gate)
        assert queued.result(timeout=30) == 25
        assert poll(lambda: seen, timeout=30) == [str(gate)]  # the next callback still ran
        assert pool.submit(square, 6).result(timeout=30) == 36


@pytest.mark.parametrize("error", RAISED, ids=RAISED_IDS)
def test_a_worker_event_callback_that_raises_never_stops_the_pool(error: BaseException) -> None:
    events: list[str] = []
    with BaseWorkerPool(1) as pool:
        pool.add_worker_event_callback(raising(error))
        pool.add_worker_event_callback(lambda kind, pid, reason: events.append(kind))
        lost = pool.submit(exit_process, 3)
        assert isinstance(lost.exception(timeout=30), WorkerLostError)
        assert poll(lambda: events, timeout=30) == ["worker_lost"]
        assert pool.submit(square, 7).result(timeout=30) == 49


@pytest.mark.parametrize("error", RAISED, ids=RAISED_IDS)
def test_an_on_event_callback_that_raises_stops_neither_pools_nor_the_supervisor(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    seen: list[tuple[str, object]] = []

    def on_event(event: PoolEvent) -> None:
        seen.append((event.kind, event.key))
        # worker_lost comes on a callback thread, pool_expired on the supervisor.
        if event.kind in ("worker_lost", "pool_expired"):
            raise error

    with WorkerPoolManager(
        1, 60, 600, clock=clock, memory_sample_interval=None, on_event=on_event
    ) as manager:
        with manager.lease("a") as pool:
            assert isinstance(pool.submit(exit_process, 3).exception(timeout=30), WorkerLostError)
            assert pool.submit(square, 2).result(timeout=30) == 4
        assert poll(lambda: ("worker_lost", "a") in seen, timeout=30)
        clock.advance(61)
        with manager.lease("b"):  # building "b" wakes the supervisor: "a" is stale
            pass
        assert poll(lambda: ("pool_disposed", "a") in seen, timeout=30)
        clock.advance(61)
        with manager.lease("c"):  # the supervisor is still there to expire "b"
            pass
        assert poll(lambda: ("pool_disposed", "b") in seen, timeout=30)
    assert "the on_event callback failed for pool_expired" in caplog.text


# -- an unexpected error in the I/O loop fails the tasks, not the waits ---------


class _IOFaultPool(BaseWorkerPool):
    """A pool whose I/O (on the I/O loop) meets ``fault`` at the next message from a worker."""

    fault: BaseException | None = None

    def _take_messages(self, *args: object) -> bool:  # type: ignore[override]
        fault, self.fault = self.fault, None
        if fault is not None:
            raise fault
        return super()._take_messages(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", RAISED[:2], ids=RAISED_IDS[:2])
def test_an_error_in_the_io_loop_fails_every_unfinished_task_and_the_pool_goes_on(
    error: BaseException, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    try:
        with _IOFaultPool(2) as pool:
            running = pool.submit(touch_and_wait, str(started), str(gate))
            assert poll(started.exists, timeout=30)
            pool.fault = error
            # A second worker starts; its first message meets the fault.
            queued = pool.submit(square, 3)
            for future in (running, queued):
                failure = future.exception(timeout=30)
                assert isinstance(failure, WorkerPoolBrokenError)
                assert failure.__cause__ is error
                assert "I/O loop failed" in str(failure)
            # Its workers were ended (the running task with them); new work gets new ones.
            assert poll(lambda: not pool.worker_pids(), timeout=30)
            assert pool.submit(square, 4).result(timeout=30) == 16
            assert pool.task_counts()["failed"] == 2
    finally:
        gate.touch()
    assert "the I/O loop failed serving" in caplog.text
