"""The records a `WorkerPoolManager` keeps and hands out.

Public (exported by ``pool_manager`` and re-exported by
``pool_manager.manager``, their documented home): `PoolState`, where a pool
is in its life; `PoolStats` and `ManagerStats`, what `WorkerPoolManager.stats`
returns (built by ``_stats.py``); `SweepResult`, what a sweep did; and
`PoolEvent`, what ``on_event`` is called with. Private: `_PoolEntry`, the
manager's record of one pool in its map, and `_SweepPlan`, what the locked
steps of a sweep decided, for the steps outside the lock; and ``ended_*``, what a
pool the manager ended says to a ``submit`` (its `PoolShutDownError`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypedDict

from . import memory
from .budget import BudgetStats
from .pool import TaskCounts, WorkerPool

__all__ = ["ManagerStats", "PoolEvent", "PoolState", "PoolStats", "SweepResult"]

logger = logging.getLogger("pool_manager")


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
    """The manager's record of one pool. All fields are guarded by the manager's lock
    (but ``ended``, once the pool is out of every list of the manager's)."""

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
    #: Why the manager ends it (``ended_expired`` and so on): set, under the
    #: manager's lock, as it decides; then read with no lock held (`tell_why`).
    ended: str = ""

    def idle(self) -> bool:
        pool = self.pool
        return self.leases == 0 and pool.unfinished_tasks == 0 and pool.unfinished_maps == 0

    def only_maps_open(self) -> bool:
        """Idle but for a lazy ``map`` iterator still open on the pool."""
        pool = self.pool
        return self.leases == 0 and pool.unfinished_tasks == 0 and pool.unfinished_maps > 0

    def tell_why(self) -> None:
        """(No lock held) Tell the pool why its manager ends it (``ended``), for the
        `PoolShutDownError` a later ``submit`` gets; a custom pool without
        ``set_shutdown_reason`` keeps its own message."""
        tell = getattr(self.pool, "set_shutdown_reason", None)
        if tell is None or not self.ended:
            return
        try:
            tell(self.ended)
        except Exception:  # (a custom pool's: its disposal goes on)
            logger.exception("telling the pool for key %r why it ends failed", self.key)

    def end(self) -> None:
        """(No lock held) `tell_why`, then dispose of the pool: blocks until its
        work is done and its workers are gone. A failure is logged."""
        self.tell_why()
        try:
            self.pool.dispose(wait=True)
        except Exception:
            logger.exception("disposing the pool for key %r failed", self.key)


# -- what a pool its manager ended says to a submit (its PoolShutDownError) -------


def _seconds(value: float) -> str:
    """``600.2`` → ``"600 s"``, ``0.25`` → ``"0.25 s"``."""
    return f"{value:.0f} s" if value >= 10 else f"{value:.3g} s"


def _ended(key: Hashable, why: str, remedy: str = "") -> str:
    remedy = remedy or f"take a new lease (manager.get_pool({key!r})) rather than keeping the pool"
    return f"the pool of key {key!r} {why}: {remedy}"


def ended_expired(key: Hashable, unused: float) -> str:
    """Unused for ``unused`` seconds, past ``stale_pool_expiration``."""
    why = f"expired (unused for {_seconds(unused)}, stale_pool_expiration)"
    return _ended(key, f"{why} and was disposed by its manager")


def ended_retired(key: Hashable, lifetime: float) -> str:
    """Older than ``max_pool_lifetime`` (``lifetime`` seconds)."""
    why = f"was retired (older than max_pool_lifetime, {_seconds(lifetime)})"
    return _ended(key, f"{why} and disposed by its manager once its leases were released")


def ended_for_memory(key: Hashable, available: int, min_available: int) -> str:
    """Disposed under memory pressure (``min_available_memory``)."""
    why = (
        f"was disposed by its manager to free memory ({available / 1e6:.0f} MB available, "
        f"below min_available_memory={min_available / 1e6:.0f} MB; it was the least recently "
        "used idle pool)"
    )
    return _ended(key, why)


def ended_with_manager(key: Hashable, how: str) -> str:
    """Its manager was ``how`` (``"shut down"``, ``"terminated"``)."""
    why = f"was disposed because its manager was {how}"
    return _ended(key, why, "create a new WorkerPoolManager to lease pools from")


@dataclass
class _SweepPlan:
    """What a sweep's passes under the manager's lock decided (`WorkerPoolManager.sweep`)."""

    retired: list[tuple[Hashable, float]] = field(default_factory=list)  #: key, age
    expired: list[tuple[Hashable, float]] = field(default_factory=list)  #: key, seconds unused
    due: list[_PoolEntry] = field(default_factory=list)  #: out of the map, to dispose now
    next_deadline: float | None = None  #: clock time of the next check, if any
    wake: bool = False  #: a pool retired idle: the supervisor should look again
