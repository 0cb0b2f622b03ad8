"""`WorkerPoolManager.stats`: the records it returns, built from a snapshot.

The manager copies what its lock guards (each entry's state, leases, ages
and last memory sample) into `PoolSnapshot` records under the lock; they
are turned into `PoolStats` and `ManagerStats` here, outside it, asking
each pool for its live counts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple

from . import memory
from ._records import ManagerStats, PoolState, PoolStats, _PoolEntry
from .budget import BudgetStats

__all__ = ["PoolSnapshot", "manager_stats"]


class PoolSnapshot(NamedTuple):
    """One entry's fields, copied under the manager's lock."""

    entry: _PoolEntry
    state: PoolState
    leases: int
    age: float  #: seconds since it was built
    unused_for: float  #: seconds since its last use
    sample: dict[int, memory.WorkerMemory]  #: its last memory sample, per pid


def pool_stats(snapshot: PoolSnapshot) -> PoolStats:
    """One pool's `PoolStats`, with its live workers and counts read now."""
    entry, state, leases, age, unused_for, sample = snapshot
    pids = entry.pool.worker_pids()
    unfinished = entry.pool.unfinished_tasks
    mapping = entry.pool.unfinished_maps > 0
    live = {pid: sample[pid] for pid in pids if pid in sample}
    # None, not 0, until every live worker has been sampled.
    rss = sum(m["rss"] for m in live.values()) if len(live) == len(pids) else None
    uss_values = [m["uss"] for m in live.values()]
    uss = None if rss is None or None in uss_values else sum(u or 0 for u in uss_values)
    return PoolStats(
        key=entry.key,
        state=state.value,
        workers=len(pids),
        worker_pids=pids,
        worker_count=entry.pool.worker_count,
        max_size=entry.pool.max_size,
        leases=leases,
        unfinished_tasks=unfinished,
        tasks=entry.pool.task_counts(),
        age=age,
        idle_for=unused_for if leases == 0 and unfinished == 0 and not mapping else 0.0,
        memory=live,
        memory_rss=rss,
        memory_uss=uss,
    )


def manager_stats(
    snapshots: Iterable[PoolSnapshot],
    *,
    sampled_at: float | None,
    last_sweep: tuple[float, float] | None,
    budget: BudgetStats,
    shut_down: bool,
) -> ManagerStats:
    """The `ManagerStats` of the pools in ``snapshots`` (the map's, then the retiring)."""
    pools: dict[Hashable, PoolStats] = {}
    retiring: list[PoolStats] = []
    total = total_rss = total_leases = total_unfinished = 0
    for snapshot in snapshots:
        stats = pool_stats(snapshot)
        total += stats["workers"]
        total_rss += stats["memory_rss"] or 0
        total_leases += stats["leases"]
        total_unfinished += stats["unfinished_tasks"]
        if snapshot.state is PoolState.RETIRING:
            retiring.append(stats)
        else:
            pools[snapshot.entry.key] = stats
    return ManagerStats(
        pools=pools,
        retiring=retiring,
        pool_count=len(pools),
        total_workers=total,
        total_leases=total_leases,
        total_unfinished_tasks=total_unfinished,
        total_memory_rss=total_rss,
        memory_sampled_at=sampled_at,
        last_sweep_at=last_sweep[0] if last_sweep else None,
        last_sweep_seconds=last_sweep[1] if last_sweep else None,
        budget=budget,
        shut_down=shut_down,
    )
