"""Prometheus metrics for a `WorkerPoolManager` (optional: ``pip install 'pool-manager[metrics]'``).

``PoolManagerCollector(manager)`` is a custom collector: each scrape calls
``manager.stats()`` once and turns that snapshot into metric families::

    from prometheus_client import REGISTRY, start_http_server
    from pool_manager.metrics import PoolManagerCollector

    REGISTRY.register(PoolManagerCollector(manager))
    start_http_server(8000)

Per-pool metrics carry the pool's key as the label ``key`` (``str(key)``
for keys that are not strings) and cover the pools in the manager's map.
Retiring pools (out of the map, finishing their work) are only counted, in
``pool_manager_retiring_pools``, but the manager totals include them.

Memory metrics appear only once the supervisor has sampled memory (never
when the manager has ``memory_sample_interval=None``), and a pool's only when
every one of its live workers has been sampled, so they never report a
partial sum as if it were the whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as error:
    raise ImportError(
        "pool_manager.metrics needs prometheus_client: pip install 'pool-manager[metrics]'"
    ) from error

from .manager import ManagerStats, PoolStats, WorkerPoolManager
from .pool import TaskCounts

__all__ = ["PoolManagerCollector"]

_PREFIX = "pool_manager_"

#: Per-pool gauges: name (after the prefix), help text, value (None: no sample).
_POOL_GAUGES: tuple[tuple[str, str, Callable[[PoolStats], float | None]], ...] = (
    ("pool_workers", "Live worker processes of the pool.", lambda p: p["workers"]),
    (
        "pool_granted_workers",
        "Workers granted to the pool so far (it starts at most this many).",
        lambda p: p["worker_count"],
    ),
    ("pool_max_workers", "Most workers the pool may be granted.", lambda p: p["max_size"]),
    ("pool_leases", "Live leases on the pool.", lambda p: p["leases"]),
    (
        "pool_unfinished_tasks",
        "Tasks accepted by the pool and not finished (running or queued).",
        lambda p: p["unfinished_tasks"],
    ),
    ("tasks_running", "Tasks running in a worker now.", lambda p: p["tasks"]["running"]),
    ("tasks_queued", "Tasks accepted and not started.", lambda p: p["tasks"]["queued"]),
    ("pool_age_seconds", "Seconds since the pool was built.", lambda p: p["age"]),
    (
        "pool_idle_seconds",
        "Seconds since the pool was last used (0 while leased or busy).",
        lambda p: p["idle_for"],
    ),
    (
        "pool_memory_rss_bytes",
        "Resident set size of the pool's workers at the last memory sample.",
        lambda p: p["memory_rss"] if _fully_sampled(p) else None,
    ),
    (
        "pool_memory_uss_bytes",
        "Unique set size of the pool's workers at the last memory sample.",
        lambda p: p["memory_uss"] if _fully_sampled(p) else None,
    ),
)

#: Per-pool counters (rendered with a ``_total`` suffix); they count since the
#: pool was built, so they reset when a key's pool is replaced.
_POOL_COUNTERS: tuple[tuple[str, str, Callable[[TaskCounts], float]], ...] = (
    ("tasks_submitted", "Tasks accepted by the pool.", lambda t: t["submitted"]),
    ("tasks_completed", "Tasks that finished with a result.", lambda t: t["completed"]),
    (
        "tasks_failed",
        "Tasks that finished with an exception (their own, or a lost worker).",
        lambda t: t["failed"],
    ),
    ("tasks_cancelled", "Tasks cancelled before they started.", lambda t: t["cancelled"]),
)

#: Manager-wide gauges, without labels.
_TOTAL_GAUGES: tuple[tuple[str, str, Callable[[ManagerStats], float | None]], ...] = (
    ("pools", "Pools in the manager's map (retiring pools excluded).", lambda s: s["pool_count"]),
    (
        "retiring_pools",
        "Pools retired for age that are still finishing their work.",
        lambda s: len(s["retiring"]),
    ),
    (
        "workers",
        "Live worker processes across all pools, retiring ones included.",
        lambda s: s["total_workers"],
    ),
    (
        "leases",
        "Live leases across all pools, retiring ones included.",
        lambda s: s["total_leases"],
    ),
    (
        "unfinished_tasks",
        "Unfinished tasks across all pools, retiring ones included.",
        lambda s: s["total_unfinished_tasks"],
    ),
    (
        "memory_rss_bytes",
        "Resident set size of every worker at the last memory sample.",
        lambda s: s["total_memory_rss"] if s["memory_sampled_at"] is not None else None,
    ),
    (
        "last_sweep_duration_seconds",
        "How long the supervisor's last sweep took.",
        lambda s: s["last_sweep_seconds"],
    ),
    (
        "workers_limit",
        "max_total_workers: the most worker processes alive across keys (absent: no cap).",
        lambda s: s["budget"]["limit"],
    ),
    (
        "pools_waiting_for_workers",
        "Pools below their fair share of max_total_workers, with work waiting.",
        lambda s: s["budget"]["waiting"],
    ),
    (
        "busy_workers",
        "Places under max_busy_workers taken: workers running tasks (or handed a place).",
        lambda s: s["budget"]["busy"],
    ),
    (
        "busy_workers_limit",
        "max_busy_workers: the most workers running tasks at once (absent: no cap).",
        lambda s: s["budget"]["busy_limit"],
    ),
    (
        "pools_waiting_for_busy_place",
        "Pools with tasks queued, in line for a place under max_busy_workers.",
        lambda s: s["budget"]["busy_waiting"],
    ),
)


def _fully_sampled(pool: PoolStats) -> bool:
    """True when every live worker of ``pool`` has a memory sample."""
    return len(pool["memory"]) == pool["workers"]


class PoolManagerCollector:
    """A Prometheus collector for one `WorkerPoolManager`.

    Register it on a ``prometheus_client.CollectorRegistry`` (or the default
    ``REGISTRY``); each scrape calls `collect`, which takes one
    ``manager.stats()`` snapshot. Registration calls only `describe`, which
    names the metric families without touching the manager.

    Args:
        manager: the manager to report on. The collector holds a reference to
            it; unregister the collector when the manager is shut down.
    """

    def __init__(self, manager: WorkerPoolManager) -> None:
        self._manager = manager

    def describe(self) -> list[Metric]:
        """The metric families `collect` yields, without samples.

        ``CollectorRegistry.register`` calls this to learn the names (and
        refuse a clashing registration) instead of calling `collect`.
        """
        return list(_Families().all())

    def collect(self) -> Iterator[Metric]:
        """Take one ``manager.stats()`` snapshot and yield its metric families."""
        stats = self._manager.stats()
        families = _Families()
        for key, pool in stats["pools"].items():
            label = [str(key)]
            families.state.add_metric([*label, pool["state"]], 1)
            for name, _, pool_value in _POOL_GAUGES:
                value = pool_value(pool)
                if value is not None:
                    families.gauges[name].add_metric(label, value)
            for name, _, count in _POOL_COUNTERS:
                families.counters[name].add_metric(label, count(pool["tasks"]))
        for name, _, total_value in _TOTAL_GAUGES:
            value = total_value(stats)
            if value is not None:
                families.gauges[name].add_metric([], value)
        yield from families.all()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self._manager!r}>"


class _Families:
    """Every metric family, empty, ready for one scrape's samples."""

    def __init__(self) -> None:
        self.state = GaugeMetricFamily(
            _PREFIX + "pool_state",
            "The pool's state (leased or idle): 1 for the state it is in.",
            labels=["key", "state"],
        )
        self.gauges: dict[str, GaugeMetricFamily] = {}
        for name, documentation, _ in _POOL_GAUGES:
            self.gauges[name] = GaugeMetricFamily(_PREFIX + name, documentation, labels=["key"])
        for name, documentation, _ in _TOTAL_GAUGES:
            self.gauges[name] = GaugeMetricFamily(_PREFIX + name, documentation, labels=[])
        self.counters: dict[str, CounterMetricFamily] = {
            name: CounterMetricFamily(_PREFIX + name, documentation, labels=["key"])
            for name, documentation, _ in _POOL_COUNTERS
        }

    def all(self) -> Iterator[Metric]:
        yield self.state
        yield from self.gauges.values()
        yield from self.counters.values()
