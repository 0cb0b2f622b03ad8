"""The records a `WorkerPoolManager` keeps and hands out.

Public (exported by ``pool_manager`` and re-exported by
``pool_manager.manager``, their documented home): `PoolState`, where a pool
is in its life; `PoolStats` and `ManagerStats`, what `WorkerPoolManager.stats`
returns (built by ``_stats.py``); `SweepResult`, what a sweep did; and
`PoolEvent`, what ``on_event`` is called with. Private: `_PoolEntry`, the
manager's record of one pool in its map, and `_SweepPlan`, what the locked
steps of a sweep decided, for the steps outside the lock.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypedDict

from . import memory
from .budget import BudgetStats
from .pool import TaskCounts, WorkerPool

__all__ = ["ManagerStats", "PoolEvent", "PoolState", "PoolStats", "SweepResult"]


class PoolState(str, enum.Enum):
    """Where a pool is in its life."""

    LEASED = "leased"  #: in the map, with at least one live lease
    IDLE = "idle"  #: in the map, no lease
    RETIRING = "retiring"  #: too old: out of the map, disposed once released and done
    DISPOSING = "disposing"  #: its workers are being stopped
    DISPOSED = "disposed"  #: gone


class PoolStats(TypedDict):
    """One pool in `WorkerPoolManager.stats`."""

    key: Hashable
    state: str  #: a `PoolState` value
    workers: int  #: live worker processes
    worker_pids: list[int]
    worker_count: int  #: workers granted so far
    max_size: int
    leases: int
    unfinished_tasks: int
    tasks: TaskCounts  #: submitted, running, queued, completed, failed, cancelled
    age: float  #: seconds since the pool was built
    idle_for: float  #: seconds since its last use (0 while leased or busy)
    memory: dict[int, memory.WorkerMemory]  #: per worker pid, at the last sample
    memory_rss: int | None  #: the workers' RSS at the last sample (bytes); None if not sampled
    memory_uss: int | None  #: their USS, where the OS gives it and it was read


class ManagerStats(TypedDict):
    """A snapshot of a manager, from `WorkerPoolManager.stats`."""

    pools: dict[Hashable, PoolStats]  #: the pools in the map, by key
    retiring: list[PoolStats]  #: retired pools still finishing their work
    pool_count: int  #: pools in the map
    # The totals count retiring pools too (pool_count does not).
    total_workers: int  #: live worker processes across all pools
    total_leases: int
    total_unfinished_tasks: int
    total_memory_rss: int  #: the workers' RSS at the last sample (bytes)
    memory_sampled_at: float | None  #: clock time of the last memory sample
    last_sweep_at: float | None  #: clock time of the supervisor's last sweep
    last_sweep_seconds: float | None  #: how long that sweep took (real seconds)
    budget: BudgetStats  #: the max_total_workers budget: limit, in use, waiting pools
    shut_down: bool


@dataclass(frozen=True)
class SweepResult:
    """What one `WorkerPoolManager.sweep` did."""

    expired: list[Hashable] = field(default_factory=list)  #: keys disposed as stale
    retired: list[Hashable] = field(default_factory=list)  #: keys retired for age
    relieved: list[Hashable] = field(default_factory=list)  #: idle keys disposed for memory
    disposed: int = 0  #: pools whose workers were stopped
    next_deadline: float | None = None  #: clock time of the next check, if any


@dataclass(frozen=True)
class PoolEvent:
    """Something that happened to a pool or one of its workers (see ``on_event``).

    ``kind`` is one of ``pool_built``, ``pool_expired``, ``pool_retired``,
    ``pool_disposed``, ``pool_relieved`` (disposed under memory pressure),
    ``worker_started``, ``worker_recycled`` (``reason``: ``max_tasks_per_worker``
    or ``max_worker_memory``), ``worker_exited`` (``reason``: ``idle_timeout``)
    and ``worker_lost`` (``reason``: how it died, or ``task_timeout``,
    ``kill_worker_memory``, ``kill_task``). Worker starts and clean exits are
    noticed at the supervisor's memory samples; losses at once.
    """

    kind: str
    key: Hashable
    at: float  #: the manager's clock
    pid: int | None = None
    reason: str = ""
    message: str = ""  #: the log line


@dataclass(eq=False)
class _PoolEntry:
    """The manager's record of one pool. All fields are guarded by the manager's lock."""

    key: Hashable
    pool: WorkerPool
    created: float
    last_used: float
    leases: int = 0
    state: PoolState = PoolState.IDLE
    serial: int = 0  #: tells this pool from a later one under the same key
    #: A sweep saw it in use by an open lazy ``map`` only: in use until the
    #: sweep that sees the map ended (when it ended is not reported).
    mapping: bool = False
    known_pids: frozenset[int] = frozenset()  #: workers seen at the last sample
    memory: dict[int, memory.WorkerMemory] = field(default_factory=dict)

    def idle(self) -> bool:
        pool = self.pool
        return self.leases == 0 and pool.unfinished_tasks == 0 and pool.unfinished_maps == 0

    def only_maps_open(self) -> bool:
        """Idle but for a lazy ``map`` iterator still open on the pool."""
        pool = self.pool
        return self.leases == 0 and pool.unfinished_tasks == 0 and pool.unfinished_maps > 0


@dataclass
class _SweepPlan:
    """What a sweep's passes under the manager's lock decided (`WorkerPoolManager.sweep`)."""

    retired: list[tuple[Hashable, float]] = field(default_factory=list)  #: key, age
    expired: list[tuple[Hashable, float]] = field(default_factory=list)  #: key, seconds unused
    due: list[_PoolEntry] = field(default_factory=list)  #: out of the map, to dispose now
    next_deadline: float | None = None  #: clock time of the next check, if any
    wake: bool = False  #: a pool retired idle: the supervisor should look again
