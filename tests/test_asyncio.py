"""asyncio: ``await pool.run(...)``, ``manager.lease_async(...)``, ``run_in_executor``.

Real worker processes; each test runs its own event loop with ``asyncio.run``.
The event loop is shown not to block by having another coroutine on the same
loop open the gate the awaited task waits for.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from pool_manager import BaseWorkerPool, WorkerPool, WorkerPoolManager

from .helpers import poll, square, touch_and_wait


async def _open_when(started: Path, gate: Path, timeout: float = 30.0) -> None:
    """On the event loop: wait (without blocking it) for ``started``, then open ``gate``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not started.exists():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{started} never appeared")
        await asyncio.sleep(0.01)
    gate.touch()


def test_run_awaits_the_result_without_blocking_the_loop(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(pool: BaseWorkerPool) -> tuple[int, int, list[int]]:
        pid, _ = await asyncio.gather(
            pool.run(touch_and_wait, str(started), str(gate)), _open_when(started, gate)
        )
        many = await asyncio.gather(*(pool.run(square, i) for i in range(30)))
        return pid, await pool.run(square, x=7), many

    with BaseWorkerPool(2) as pool:
        pid, seven, many = asyncio.run(main(pool))
    assert pid > 0 and seven == 49 and many == [i * i for i in range(30)]


def test_run_raises_what_the_task_raised() -> None:
    async def main(pool: BaseWorkerPool) -> None:
        await pool.run(int, "not a number")

    with BaseWorkerPool(1) as pool, pytest.raises(ValueError, match="not a number"):
        asyncio.run(main(pool))


def test_run_on_a_full_pool_waits_on_a_thread_not_on_the_loop(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(pool: BaseWorkerPool) -> list[int]:
        first = asyncio.ensure_future(pool.run(touch_and_wait, str(started), str(gate)))
        # One worker, max_pending=0: the second submit has no room until the
        # first task ends. It waits on a thread; the loop goes on and opens the gate.
        second = asyncio.ensure_future(pool.run(square, 6))
        await _open_when(started, gate)
        return [await first, await second]

    with BaseWorkerPool(1, max_pending=0) as pool:
        pid, thirty_six = asyncio.run(main(pool))
    assert pid > 0 and thirty_six == 36


def test_cancelling_the_awaiting_task_cancels_a_queued_submission(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(pool: BaseWorkerPool) -> None:
        busy = asyncio.ensure_future(pool.run(touch_and_wait, str(started), str(gate)))
        while not started.exists():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(pool.run(square, 3))  # behind the busy task
        await asyncio.sleep(0)  # let it submit
        assert pool.task_counts()["queued"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.touch()
        await busy

    with BaseWorkerPool(1) as pool:
        asyncio.run(main(pool))
        counts = pool.task_counts()
    assert counts["cancelled"] == 1 and counts["completed"] == 1


def test_cancelling_a_run_blocked_by_backpressure_loses_nothing(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(pool: BaseWorkerPool) -> int:
        busy = asyncio.ensure_future(pool.run(touch_and_wait, str(started), str(gate)))
        while not started.exists():
            await asyncio.sleep(0.01)
        blocked = asyncio.ensure_future(pool.run(square, 4))  # no room: on a thread
        while not pool._blocked_submits:  # its submit waits for room
            await asyncio.sleep(0.01)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        gate.touch()
        return await busy

    with BaseWorkerPool(1, max_pending=0) as pool:
        assert asyncio.run(main(pool)) > 0
        # The submission made once room came was cancelled, or had started
        # and ran: either way it settles, and the pool is left with nothing.
        assert poll(lambda: pool.unfinished_tasks == 0, timeout=30)
        counts = pool.task_counts()
    assert counts["submitted"] == 2
    assert counts["cancelled"] + counts["completed"] == 2


def test_lease_async_takes_and_releases_a_lease() -> None:
    async def main(manager: WorkerPoolManager) -> tuple[list[int], int]:
        async with manager.lease_async("tenant", send_size=2) as pool:
            leases = manager.stats()["pools"]["tenant"]["leases"]
            results = await asyncio.gather(*(pool.run(square, i) for i in range(10)))
        return results, leases

    with WorkerPoolManager(2, 60, 600) as manager:
        results, leases_inside = asyncio.run(main(manager))
        pool_stats = manager.stats()["pools"]["tenant"]
    assert results == [i * i for i in range(10)]
    assert leases_inside == 1 and pool_stats["leases"] == 0
    assert pool_stats["worker_count"] == 2


def test_lease_async_releases_the_lease_when_the_task_is_cancelled(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(manager: WorkerPoolManager) -> None:
        async def leased_work() -> None:
            async with manager.lease_async("tenant") as pool:
                await pool.run(touch_and_wait, str(started), str(gate))

        task = asyncio.ensure_future(leased_work())
        while not started.exists():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.touch()

    with WorkerPoolManager(1, 60, 600) as manager:
        asyncio.run(main(manager))
        assert manager.stats()["pools"]["tenant"]["leases"] == 0


def test_run_in_executor_uses_the_pool_as_an_executor() -> None:
    async def main(pool: BaseWorkerPool) -> list[int]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(pool, square, i) for i in range(5)))

    with BaseWorkerPool(2) as pool:
        assert asyncio.run(main(pool)) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_run_in_executor_on_a_full_pool_never_blocks_the_loop(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"

    async def main(pool: WorkerPool) -> list[int]:
        loop = asyncio.get_running_loop()
        first = loop.run_in_executor(pool, touch_and_wait, str(started), str(gate))
        # One worker, max_pending=0: the pool is full. A submit on the loop's
        # thread is admitted at once, beyond max_pending, so the loop goes on
        # (here, to open the gate the first task waits for).
        second = loop.run_in_executor(pool, square, 6)
        await _open_when(started, gate)
        return [await first, await second]

    try:
        with WorkerPoolManager(1, 60, 600, max_pending=0) as manager, manager.lease("a") as pool:
            pid, thirty_six = asyncio.run(main(pool))
            assert pool.task_counts()["completed"] == 2
    finally:
        gate.touch()
    assert pid > 0 and thirty_six == 36


def test_a_lease_async_cancelled_while_the_pool_is_built_is_released() -> None:
    building, gate = threading.Event(), threading.Event()

    def slow_factory(max_size: int) -> BaseWorkerPool:
        building.set()
        assert gate.wait(30)
        return BaseWorkerPool(max_size)

    async def main(manager: WorkerPoolManager) -> None:
        async def leased() -> None:
            async with manager.lease_async("slow", factory=slow_factory):
                raise AssertionError("the lease was cancelled before it was taken")

        task = asyncio.ensure_future(leased())
        while not building.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()  # the thread goes on to take the lease; it is released at once

    with WorkerPoolManager(1, 60, 600) as manager:
        try:
            asyncio.run(main(manager))
        finally:
            gate.set()
        assert poll(lambda: manager.stats()["pools"]["slow"]["leases"] == 0, timeout=30)
