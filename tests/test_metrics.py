"""The Prometheus collector: real pools, real tasks, values read back from a scrape."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pool_manager import WorkerPoolManager
from pool_manager.metrics import PoolManagerCollector

from .helpers import FakeClock, poll, raise_value_error, square, touch_and_wait

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    """The exposition text, and every sample in it by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def keys_of(samples: Samples) -> set[str]:
    return {dict(labels)["key"] for _, labels in samples if dict(labels).get("key") is not None}


def registry_for(manager: WorkerPoolManager) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PoolManagerCollector(manager))
    return registry


def test_a_scrape_reports_each_pool_by_key_and_the_totals() -> None:
    with WorkerPoolManager(2, 600, 3600, memory_sample_interval=None) as manager:
        registry = registry_for(manager)
        with manager.lease("a", 2) as a, manager.lease(("t", 1)) as t:
            assert [a.submit(square, i).result(timeout=60) for i in range(3)] == [0, 1, 4]
            with pytest.raises(ValueError, match="boom"):
                a.submit(raise_value_error, "boom").result(timeout=60)
            assert t.submit(square, 7).result(timeout=60) == 49
            a_workers, t_workers = len(a.worker_pids()), len(t.worker_pids())
            text, samples = scrape(registry)
            assert (len(a.worker_pids()), len(t.worker_pids())) == (a_workers, t_workers)

        assert 'pool_manager_tasks_completed_total{key="a"} 3.0' in text
        assert value(samples, "pool_manager_tasks_submitted_total", key="a") == 4
        assert value(samples, "pool_manager_tasks_failed_total", key="a") == 1
        assert value(samples, "pool_manager_tasks_cancelled_total", key="a") == 0
        assert value(samples, "pool_manager_pool_state", key="a", state="leased") == 1
        assert value(samples, "pool_manager_pool_workers", key="a") == a_workers >= 1
        assert value(samples, "pool_manager_pool_granted_workers", key="a") == 2
        assert value(samples, "pool_manager_pool_max_workers", key="a") == 2
        assert value(samples, "pool_manager_pool_leases", key="a") == 1
        assert value(samples, "pool_manager_pool_unfinished_tasks", key="a") == 0
        assert value(samples, "pool_manager_tasks_running", key="a") == 0
        assert value(samples, "pool_manager_tasks_queued", key="a") == 0
        assert value(samples, "pool_manager_pool_idle_seconds", key="a") == 0  # leased
        assert value(samples, "pool_manager_pool_age_seconds", key="a") > 0

        # A tuple key is labelled with its str().
        tuple_key = str(("t", 1))
        assert keys_of(samples) == {"a", tuple_key}
        assert value(samples, "pool_manager_tasks_submitted_total", key=tuple_key) == 1
        assert value(samples, "pool_manager_tasks_completed_total", key=tuple_key) == 1
        assert value(samples, "pool_manager_tasks_failed_total", key=tuple_key) == 0
        assert value(samples, "pool_manager_pool_workers", key=tuple_key) == t_workers >= 1
        assert value(samples, "pool_manager_pool_granted_workers", key=tuple_key) == 1

        assert value(samples, "pool_manager_pools") == 2
        assert value(samples, "pool_manager_retiring_pools") == 0
        assert value(samples, "pool_manager_workers") == a_workers + t_workers
        assert value(samples, "pool_manager_leases") == 2
        assert value(samples, "pool_manager_unfinished_tasks") == 0
        # Memory is never sampled with memory_sample_interval=None: no made-up zeros.
        assert not {name for name, _ in samples if "memory" in name}

        # Released: the state flips, the counters stay.
        _, samples = scrape(registry)
        assert value(samples, "pool_manager_pool_state", key="a", state="idle") == 1
        assert ("pool_manager_pool_state", (("key", "a"), ("state", "leased"))) not in samples
        assert value(samples, "pool_manager_pool_leases", key="a") == 0
        assert value(samples, "pool_manager_leases") == 0
        assert value(samples, "pool_manager_tasks_completed_total", key="a") == 3


def test_running_and_queued_tasks_are_read_live(tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with WorkerPoolManager(1, 600, 3600, memory_sample_interval=None) as manager:
        registry = registry_for(manager)
        with manager.lease("busy") as pool:
            blocker = pool.submit(touch_and_wait, started, gate)
            queued = pool.submit(square, 3)
            assert poll(lambda: Path(started).exists())
            _, samples = scrape(registry)
            Path(gate).touch()
            assert blocker.result(timeout=60) > 0 and queued.result(timeout=60) == 9
            _, after = scrape(registry)

    assert value(samples, "pool_manager_tasks_running", key="busy") == 1
    assert value(samples, "pool_manager_tasks_queued", key="busy") == 1
    assert value(samples, "pool_manager_pool_unfinished_tasks", key="busy") == 2
    assert value(samples, "pool_manager_unfinished_tasks") == 2
    assert value(samples, "pool_manager_tasks_submitted_total", key="busy") == 2
    assert value(samples, "pool_manager_tasks_completed_total", key="busy") == 0
    assert value(after, "pool_manager_tasks_running", key="busy") == 0
    assert value(after, "pool_manager_tasks_completed_total", key="busy") == 2


def test_a_retiring_pool_is_counted_but_not_labelled() -> None:
    clock = FakeClock()
    with WorkerPoolManager(1, 600, 3600, memory_sample_interval=None, clock=clock) as manager:
        registry = registry_for(manager)
        old, done = manager.get_pool("old")
        try:
            assert old.submit(square, 2).result(timeout=60) == 4
            clock.advance(3600)
            assert manager.sweep().retired == ["old"]
            _, samples = scrape(registry)
            assert keys_of(samples) == set()
            assert value(samples, "pool_manager_pools") == 0
            assert value(samples, "pool_manager_retiring_pools") == 1
            # The totals still count the retiring pool's workers and lease.
            assert value(samples, "pool_manager_workers") == len(old.worker_pids()) >= 1
            assert value(samples, "pool_manager_leases") == 1

            # The key's next pool is a new one: its counters start again.
            with manager.lease("old") as new:
                assert new is not old
                _, samples = scrape(registry)
            assert keys_of(samples) == {"old"}
            assert value(samples, "pool_manager_tasks_submitted_total", key="old") == 0
            assert value(samples, "pool_manager_retiring_pools") == 1
        finally:
            done()


def test_memory_metrics_appear_once_every_worker_is_sampled() -> None:
    clock = FakeClock()
    with WorkerPoolManager(2, 600, 3600, clock=clock, memory_sample_interval=5) as manager:
        registry = registry_for(manager)
        with manager.lease("a", 2) as pool:
            assert pool.submit(square, 3).result(timeout=60) == 9
        clock.advance(5)  # the next sample is due (the first came when the pool was built)
        manager.sweep()

        def sampled() -> bool:
            a = manager.stats()["pools"]["a"]
            return bool(a["memory"]) and set(a["memory"]) == set(pool.worker_pids())

        assert poll(sampled)
        stats = manager.stats()
        _, samples = scrape(registry)

    a = stats["pools"]["a"]
    assert a["memory_uss"] is not None
    assert value(samples, "pool_manager_pool_memory_rss_bytes", key="a") == a["memory_rss"] > 0
    assert value(samples, "pool_manager_pool_memory_uss_bytes", key="a") == a["memory_uss"] > 0
    assert value(samples, "pool_manager_memory_rss_bytes") == stats["total_memory_rss"] > 0
    assert value(samples, "pool_manager_last_sweep_duration_seconds") >= 0


class _NoStats:
    """A manager stand-in that fails the test if anything asks it for stats."""

    def stats(self) -> None:
        raise AssertionError("stats() called at registration")


def test_registration_calls_describe_not_stats() -> None:
    collector = PoolManagerCollector(_NoStats())  # type: ignore[arg-type]
    registry = CollectorRegistry(auto_describe=True)  # the default REGISTRY's setting
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolManagerCollector(_NoStats()))  # type: ignore[arg-type]
    described = collector.describe()
    assert all(not family.samples for family in described)
    assert all(family.name.startswith("pool_manager_") for family in described)

    with WorkerPoolManager(1, 600, 3600, memory_sample_interval=None) as manager:
        collected = list(PoolManagerCollector(manager).collect())
    assert [(f.name, f.type) for f in collected] == [(f.name, f.type) for f in described]


def test_without_prometheus_client_the_import_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "pool_manager.metrics")
    with pytest.raises(ImportError, match=r"pip install 'pool-manager\[metrics\]'") as caught:
        importlib.import_module("pool_manager.metrics")
    assert isinstance(caught.value.__cause__, ImportError)
    assert "pool_manager.metrics" not in sys.modules  # a later import tries again


def test_the_caps_across_keys_are_reported(tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with WorkerPoolManager(
        1, 600, 3600, memory_sample_interval=None, max_total_workers=8, max_busy_workers=1
    ) as manager:
        registry = registry_for(manager)
        with manager.lease("a") as a, manager.lease("b") as b:
            blocker = a.submit(touch_and_wait, started, gate)
            assert poll(lambda: Path(started).exists())
            waiting = b.submit(square, 4)  # no place left: "b" waits in line
            _, samples = scrape(registry)
            Path(gate).touch()
            assert blocker.result(timeout=60) > 0 and waiting.result(timeout=60) == 16
        _, after = scrape(registry)

    assert value(samples, "pool_manager_workers_limit") == 8
    assert value(samples, "pool_manager_busy_workers_limit") == 1
    assert value(samples, "pool_manager_busy_workers") == 1
    assert value(samples, "pool_manager_pools_waiting_for_busy_place") == 1
    assert value(after, "pool_manager_busy_workers") == 0
    assert value(after, "pool_manager_pools_waiting_for_busy_place") == 0
