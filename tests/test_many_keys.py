"""A thousand keys through one manager, then expired with the fake clock."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from pool_manager import WorkerPoolManager

from .helpers import FakeClock, square


def test_a_thousand_keys_used_by_several_threads_then_expired_leave_nothing() -> None:
    keys = 1000
    clock = FakeClock()
    clock_lock = threading.Lock()
    manager = WorkerPoolManager(
        1, 600, 3600, clock=clock, worker_idle_timeout=0.2, memory_sample_interval=5
    )
    futures: list[Future[int]] = []
    stop = threading.Event()

    def tick() -> None:
        # Time passes: samples come due, and idle pools release their executors.
        while not stop.wait(0.1):
            with clock_lock:
                clock.advance(5)
            manager.sweep()

    def use(i: int) -> None:
        with manager.lease(f"tenant-{i}") as pool:
            futures.append(pool.submit(square, i))
            futures[-1].result(timeout=120)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        with ThreadPoolExecutor(8) as callers:
            list(callers.map(use, range(keys)))
    finally:
        stop.set()
        ticker.join()
    assert sorted(f.result() for f in futures) == [i * i for i in range(keys)]
    assert all(f.done() for f in futures)
    clock.advance(3600)  # past every stale deadline and lifetime
    manager.sweep()
    deadline = time.monotonic() + 60
    while (len(manager) or manager.stats()["retiring"]) and time.monotonic() < deadline:
        manager.sweep()
        time.sleep(0.05)
    assert len(manager) == 0 and manager.stats()["total_workers"] == 0
    manager.shutdown()
