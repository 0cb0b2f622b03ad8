"""Memory: worker samples in stats, and idle pools disposed under memory pressure."""

from __future__ import annotations

import logging
import os

import pytest

from pool_manager import WorkerPoolManager, memory

from .helpers import FakeClock, hoard, poll, square


def test_the_supervisor_samples_every_workers_memory_at_its_interval() -> None:
    clock = FakeClock()
    with WorkerPoolManager(2, 600, 3600, clock=clock, memory_sample_interval=5) as manager:
        with manager.lease("a", 2) as pool:
            pids = {pool.submit(hoard, 60).result(timeout=60) for _ in range(4)}
        clock.advance(5)  # the first sample came when the pool was built, with no worker
        result = manager.sweep()
        stats = manager.stats()
        assert stats["memory_sampled_at"] == clock.now
        a = stats["pools"]["a"]
        assert set(a["memory"]) == set(pool.worker_pids()) and pids <= set(a["memory"])
        assert all(m["rss"] > 0 for m in a["memory"].values())
        assert a["memory_uss"] is not None and a["memory_uss"] > 0
        assert a["memory_rss"] >= 60_000_000  # the hoarded bytes are seen
        assert stats["total_memory_rss"] == a["memory_rss"]
        assert result.next_deadline == clock.now + 5
        first = clock.now
        clock.advance(4)
        manager.sweep()
        assert manager.stats()["memory_sampled_at"] == first  # not due yet
        clock.advance(1)
        manager.sweep()
        assert manager.stats()["memory_sampled_at"] == first + 5


def test_sample_workers_skips_processes_that_are_gone() -> None:
    import os

    assert set(memory.sample_workers([os.getpid(), 2**22 + 12345])) == {os.getpid()}


def test_idle_pools_are_disposed_least_recently_used_first_under_memory_pressure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    pressure = False
    managers: list[WorkerPoolManager] = []

    def available() -> int:
        # Low while the test applies pressure and more than two pools remain:
        # the same answer whichever thread (test or supervisor) sweeps.
        return (100 if pressure and len(managers[0]) > 2 else 5_000) * 1_000_000

    monkeypatch.setattr(memory, "available_memory", available)
    with WorkerPoolManager(
        1,
        600,
        3600,
        clock=clock,
        memory_sample_interval=5,
        min_available_memory="1GB",
    ) as manager:
        managers.append(manager)
        _, done = manager.get_pool("leased")  # the least recently used, but leased
        for key in ("a", "b", "c"):
            clock.advance(1)
            with manager.lease(key) as pool:
                pool.submit(square, 2).result(timeout=60)
        pressure = True
        clock.advance(5)  # the next sample is due
        with caplog.at_level(logging.WARNING, logger="pool_manager"):
            manager.sweep()
        # The supervisor may be the one that sampled: wait for either to finish.
        assert poll(lambda: set(manager.keys()) == {"c", "leased"}, timeout=30)
        assert poll(lambda: "key 'b'" in caplog.text, timeout=30)
        assert "memory pressure: 100 MB available" in caplog.text
        assert "min_available_memory=1000 MB" in caplog.text
        assert "key 'a' (least recently used)" in caplog.text
        assert caplog.text.index("key 'a'") < caplog.text.index("key 'b'")
        done()


def test_min_available_memory_needs_sampling() -> None:
    with pytest.raises(ValueError, match="memory_sample_interval"):
        WorkerPoolManager(1, 1, 1, memory_sample_interval=None, min_available_memory="1GB")
    with pytest.raises(ValueError):
        WorkerPoolManager(1, 1, 1, min_available_memory="lots")


def test_an_idle_pool_whose_workers_exited_releases_its_threads_and_pipes() -> None:
    import threading

    def io_threads() -> int:
        return sum(t.name == "pool_manager-io" for t in threading.enumerate())

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    clock = FakeClock()
    with WorkerPoolManager(
        1, 600, 3600, clock=clock, memory_sample_interval=5, worker_idle_timeout=0.2
    ) as manager:
        baseline, baseline_fds = io_threads(), fds()
        with manager.lease("a") as pool:
            assert pool.submit(square, 3).result(timeout=60) == 9
            assert io_threads() == baseline + 1 and fds() > baseline_fds
        assert poll(lambda: not pool.worker_pids(), timeout=30)  # the idle timeout
        # The pool's I/O thread ends with its last worker, and its pipes close.
        assert poll(lambda: io_threads() == baseline, timeout=30)
        assert poll(lambda: fds() == baseline_fds, timeout=30)
        clock.advance(5)
        manager.sweep()
        with manager.lease("a") as again:
            assert again is pool
            assert pool.submit(square, 4).result(timeout=60) == 16  # rebuilt on demand
