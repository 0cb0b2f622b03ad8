"""``WorkerPoolManager``: the key → pool map, leases, and each pool's life.

A pool's life (see the package docstring for the diagram)::

    (none) --get_pool--> LEASED <--done()/get_pool--> IDLE
    LEASED/IDLE --age >= max_pool_lifetime--> RETIRING (out of the map)
    IDLE --idle >= stale_pool_expiration--> DISPOSING --> DISPOSED
    RETIRING --last lease released, work done--> DISPOSING --> DISPOSED

The manager only ever disposes a pool with no lease and no unfinished work
(an open lazy ``map`` iterator counts as work), so disposal never cancels
anything. Time-driven transitions happen in
`sweep`, which the supervisor thread runs at each deadline and tests run by
hand with a fake clock.

The manager keeps the leases (`_Lease`, ``_lease.py``), the building of each key's pool,
disposal and shutdown here, and leaves the rest to private modules, all
under its one lock where they hold state: ``_poolmap.py`` (the map, the
retiring pools and their deadlines: which pools a sweep retires and
expires), ``_records.py`` (`PoolState`, `PoolStats`, `ManagerStats`,
`SweepResult`, `PoolEvent`, re-exported here, and the `_PoolEntry` of each
pool), ``_events.py`` (each event, logged and passed to ``on_event``),
``_sampling.py`` (the memory samples) and ``_stats.py`` (`stats`' records).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from . import _process, _signals, memory
from ._durations import Duration, to_bytes, to_count, to_seconds
from ._engines import build_pool, resolve_engine
from ._events import EventLog
from ._lease import _check_lease, _Lease
from ._native_threads import NativeThreads
from ._poolmap import PoolMap

# The records live in _records, USS_EVERY in _sampling; this module is their
# documented home too (``X as X``: re-exported, though not in __all__).
from ._records import ManagerStats, PoolState, PoolStats, SweepResult, _PoolEntry, _SweepPlan
from ._records import PoolEvent as PoolEvent
from ._sampling import USS_EVERY as USS_EVERY
from ._sampling import MemorySampler
from ._stats import PoolSnapshot, manager_stats
from .budget import BusySlots, WorkerBudget, default_busy_limit, default_limit
from .errors import FactoryError, ManagerShutDownError, UsedAfterForkError
from .pool import DEFAULT_IDLE_TIMEOUT, TakenOnAThread, WorkerPool
from .supervisor import Supervisor

__all__ = [
    "Factory",
    "ManagerStats",
    "PoolState",
    "PoolStats",
    "SweepResult",
    "WorkerPoolManager",
]

logger = logging.getLogger("pool_manager")

#: Builds the pool for a new key; called with the manager's ``pool_size``.
Factory = Callable[[int], WorkerPool]


def _shut_down(pool: WorkerPool) -> bool:
    """True if ``pool`` refuses work for good (a custom pool may not say: then False)."""
    return bool(getattr(pool, "is_shut_down", False))


_serials = itertools.count(1)
#: A default the manager works out (``max_pending``, the caps across keys).
_UNSET: Any = object()
_live_managers: weakref.WeakSet[WorkerPoolManager] = weakref.WeakSet()
_signals.configure_managers(lambda: list(_live_managers))


if hasattr(os, "register_at_fork"):
    # A process forked from ours: the managers it inherited are the parent's
    # (their supervisors did not come along, their pools went inert with
    # pool.py's own hook). No exit hook or SIGTERM handler here acts on them.
    os.register_at_fork(after_in_child=_live_managers.clear)


@atexit.register
def _shutdown_forgotten_managers() -> None:
    # By now the pools' exit hook (_signals.py) has let accepted work finish
    # (as ProcessPoolExecutor does at exit); this stops the supervisors and
    # joins whatever is left, so that no worker outlives the interpreter.
    for manager in list(_live_managers):
        manager.shutdown(wait=True)


def _let_go(handles_signals: bool) -> None:
    """(The supervisor, its manager collected without shutdown) let go of what it held.

    Its pools went with it (each pool's finalizer ends its workers), or live
    on while they have unfinished tasks, and end when those are done.
    """
    _process.release_server()
    if handles_signals:
        _signals.release()


class WorkerPoolManager:
    """Many keyed process pools, built lazily, cached while used, expired when not.

    Args:
        pool_size: the most worker processes any one key's pool may use.
        stale_pool_expiration: a pool with no lease and no unfinished work
            (an unfinished lazy ``map`` iterator counts as work) for this
            long (seconds, or a ``timedelta``) is disposed.
        max_pool_lifetime: a pool older than this is retired: the next
            ``get_pool`` builds a fresh one, and the old one is disposed once
            its leases are released and its work is done.
        max_pending: backpressure of the pools the default factory builds:
            ``submit`` blocks while the granted workers are busy and this
            many tasks wait (never on a done-callback's thread nor on an
            event loop's: see `BaseWorkerPool.submit`). Default:
            ``pool_size`` (as the Go package). ``None`` never blocks.
        worker_idle_timeout: seconds an idle worker process lives before it
            exits (it starts again on demand); ``None`` keeps it.
        max_total_workers: the most worker processes alive across all keys
            (memory; see `pool_manager.budget` for how workers move between
            pools and the fairness rule). Default: `budget.default_limit`,
            four per usable CPU, at least 32 and at least ``pool_size``.
            ``None``: no cap beyond each pool's ``pool_size``.
        max_busy_workers: the most worker processes running tasks at once
            across all keys (CPU): many keys' warm pools never oversubscribe
            the machine, and the places go round the keys with work (see
            `budget.BusySlots`). Default: one per usable CPU, and at least
            ``pool_size``, so that a key alone runs ``pool_size`` tasks at
            once. ``None``: no cap: use it when tasks wait for each other
            (across keys too) or mostly wait on I/O. Pools from a custom
            factory are under both caps if they are `BaseWorkerPool` or
            `LokyWorkerPool` instances that have not run work yet.
        max_tasks_per_worker, max_worker_memory, kill_worker_memory, task_timeout,
            shared_data, native_threads: passed to the pools the default factory
            builds (see `BaseWorkerPool`; the shared data is pickled once: one copy).
        memory_sample_interval: seconds between two samples of every
            worker's RSS (in `stats`; USS is read at one sample in
            ``USS_EVERY``); ``None`` never samples.
        min_available_memory: bytes, or a string like ``"2GB"``: when the
            machine's available memory is below this at a sample, idle pools
            are disposed, least recently used first, until it is not.
        handle_signals: a manager created in the main thread installs (once
            per process) a SIGTERM handler that lets accepted work finish
            within ``shutdown_grace`` seconds, then ends the workers still
            running and the process, as SIGTERM would (or calls the handler
            the application set before). False leaves signals alone.
        on_event: called with a `PoolEvent` for each pool built, expired,
            retired, disposed, and each worker started, recycled or lost (on
            the supervisor's, a pool's or the caller's thread: keep it short;
            what it raises is logged and ignored, and on the library's own
            threads that includes ``SystemExit``). The same events are
            logged on the ``"pool_manager"`` logger.
        clock: a monotonic clock in seconds; inject a fake one in tests and
            call `sweep` after moving it. (Task deadlines and memory limits
            are real time and real bytes, enforced in the workers.)
        engine: what the default factory builds pools on: ``"fork_server"``
            (`BaseWorkerPool`) or ``"loky"`` (`pool_manager.loky.LokyWorkerPool`;
            its ``shared_data`` is in named shared memory). Default:
            `DEFAULT_ENGINE` (``_platform.py``).

    Raises:
        TypeError, ValueError: for arguments of the wrong type or range.
        EngineUnavailableError, ImportError: the engine cannot run here (the
            fork server off Linux; loky without loky installed).
        ForkServerError: the fork server (that worker processes are forked
            from) died as it started; the message holds what it printed.
        OSError: the fork server could not be started (out of file
            descriptors or processes, say).
    """

    def __init__(
        self,
        pool_size: int,
        stale_pool_expiration: Duration,
        max_pool_lifetime: Duration,
        *,
        max_pending: int | None = _UNSET,
        worker_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_total_workers: int | None = _UNSET,
        max_busy_workers: int | None = _UNSET,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        kill_worker_memory: int | str | None = None,
        task_timeout: Duration | None = None,
        shared_data: object = None,
        native_threads: NativeThreads = "auto",
        memory_sample_interval: Duration | None = 10.0,
        min_available_memory: int | str | None = None,
        handle_signals: bool = True,
        shutdown_grace: Duration = 30.0,
        on_event: Callable[[PoolEvent], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        engine: str | None = None,
    ) -> None:
        #: What the default factory builds pools on: ``"fork_server"`` or ``"loky"``.
        self.engine: str = resolve_engine(engine)
        self._pool_size = to_count("pool_size", pool_size, minimum=1)
        stale = to_seconds("stale_pool_expiration", stale_pool_expiration)
        lifetime = to_seconds("max_pool_lifetime", max_pool_lifetime)
        assert stale is not None and lifetime is not None
        if max_pending is _UNSET:
            max_pending = self._pool_size
        elif max_pending is not None:
            to_count("max_pending", max_pending, minimum=0)
        self._max_pending: int | None = max_pending
        self._worker_idle_timeout = to_seconds(
            "worker_idle_timeout", worker_idle_timeout, allow_none=True
        )
        if max_total_workers is _UNSET:
            max_total_workers = default_limit(self._pool_size)
        self._budget = WorkerBudget(max_total_workers)
        if max_busy_workers is _UNSET:
            max_busy_workers = default_busy_limit(self._pool_size)
        self._busy = BusySlots(max_busy_workers)
        self._worker_options: dict[str, Any] = {
            "max_tasks_per_worker": max_tasks_per_worker,
            "max_worker_memory": max_worker_memory,
            "kill_worker_memory": kill_worker_memory,
            "task_timeout": task_timeout,
            "shared_data": shared_data,
            "native_threads": native_threads,
        }
        # Checked now, by the pool that would take them, rather than at the
        # first get_pool; it pickles the shared data, once for every pool.
        checked = self.default_factory(1)  # (starts nothing)
        # (A BaseWorkerPool's, or a LokyWorkerPool's: pickled, for every pool.)
        self._worker_options["shared_data"] = getattr(checked, "_shared", shared_data)
        sample_every = to_seconds("memory_sample_interval", memory_sample_interval, allow_none=True)
        self._min_available = to_bytes("min_available_memory", min_available_memory)
        if self._min_available is not None and sample_every is None:
            raise ValueError("min_available_memory needs a memory_sample_interval")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be callable")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self._clock = clock
        self._events = EventLog(on_event, clock)
        #: The process that built it: in a process forked from it, the manager
        #: is inert (using it raises UsedAfterForkError; shutting it down does
        #: nothing).
        self._owner_pid = os.getpid()
        self._last_sweep: tuple[float, float] | None = None  # clock time, real seconds

        # _lock guards _map (the pools by key, the retiring ones, their
        # deadlines), _building, _disposing, _shut_down, every _PoolEntry's
        # fields, and _memory's schedule. Never held while a factory runs or a
        # pool is disposed.
        self._lock = threading.Lock()
        self._map = PoolMap(stale, lifetime)
        self._memory = MemorySampler(sample_every, self._map, self._lock, self._events)
        self._building: dict[Hashable, Future[None]] = {}
        self._disposing: set[_PoolEntry] = set()
        self._shut_down = False

        grace = to_seconds("shutdown_grace", shutdown_grace)
        assert grace is not None
        self.shutdown_grace: float = grace

        # The fork server starts now, before anything else is set up (see its docstring).
        self._holds_server = False
        if self.engine == "fork_server":
            _process.acquire_ready_server()
            self._holds_server = True

        self.handles_signals = bool(handle_signals) and _signals.install_sigterm_handler()
        self._supervisor = Supervisor(
            self._supervised_sweep,
            clock,
            name=f"pool_manager-supervisor-{id(self):x}",
            on_gone=functools.partial(_let_go, self.handles_signals),
        )
        self._supervisor.start()
        _live_managers.add(self)

    # -- configuration ---------------------------------------------------

    @property
    def pool_size(self) -> int:
        """The most worker processes any one key's pool may use."""
        return self._pool_size

    @property
    def max_total_workers(self) -> int | None:
        """The most worker processes alive across all keys (None: no cap)."""
        return self._budget.limit

    @property
    def max_busy_workers(self) -> int | None:
        """The most worker processes running tasks at once across all keys (None: no cap)."""
        return self._busy.limit

    @property
    def stale_pool_expiration(self) -> float:
        """Seconds an unused pool is kept."""
        return self._map.stale_after

    @property
    def max_pool_lifetime(self) -> float:
        """Seconds after which a pool is retired."""
        return self._map.max_lifetime

    def _inherited(self) -> bool:
        """True in a process forked from the one that built the manager."""
        return os.getpid() != self._owner_pid

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            raise UsedAfterForkError.for_object("WorkerPoolManager", self._owner_pid)

    # -- leases ----------------------------------------------------------

    def default_factory(self, max_size: int) -> WorkerPool:
        """The factory `get_pool` uses: a pool on the manager's `engine`, with its settings."""
        return build_pool(
            self.engine,
            max_size,
            self._max_pending,
            self._worker_idle_timeout,
            self._worker_options,
        )

    def get_pool(self, key: Hashable, send_size: int = 1) -> tuple[WorkerPool, Callable[[], None]]:
        """Lease the pool for ``key``, building it with `default_factory` if needed.

        Grants the pool ``min(send_size, pool_size - granted)`` more workers.
        Returns ``(pool, done)``: call ``done()`` when finished with the pool
        (again does nothing); until then the pool is never disposed. A pool
        shut down by its user (``with pool:``) leaves the map here, as a
        retired one does, and a fresh one is built.

        Blocks only while another thread builds this key's pool.

        Raises:
            TypeError: ``key`` is unhashable, or ``send_size`` not an int.
            ValueError: ``send_size`` < 0.
            ManagerShutDownError: (a ``RuntimeError``) after `shutdown`.
        """
        return self.get_pool_with_factory(key, send_size, self.default_factory)

    def get_pool_with_factory(
        self, key: Hashable, send_size: int, factory: Factory
    ) -> tuple[WorkerPool, Callable[[], None]]:
        """Like `get_pool`, building a missing pool with ``factory(pool_size)``.

        However many threads race for a new key, ``factory`` runs once, and
        they all lease the pool it returns. A factory's exception reaches every
        caller that waited for it, unchanged, and nothing is cached.

        Raises:
            TypeError: as `get_pool`, or ``factory`` not callable.
            FactoryError: (a ``TypeError``) the factory returned something that
                is not a `WorkerPool`.
            Exception: whatever the factory raised.
        """
        self._check_owner()
        _check_lease(key, send_size, factory)

        retired_age: float | None = None
        while True:
            with self._lock:
                if self._shut_down:
                    raise ManagerShutDownError(
                        "this WorkerPoolManager is shut down; create a new one"
                    )
                now = self._clock()
                entry = self._map.entries.get(key)
                if entry is not None and _shut_down(entry.pool):
                    # Shut down by its user (``with pool:``, the exit hook):
                    # it leaves the map as a retired pool would, and is
                    # disposed once its leases are released and its work done.
                    self._retire_locked(entry)
                    entry = None
                if entry is not None and now - entry.created >= self._map.max_lifetime:
                    self._retire_locked(entry)
                    retired_age = now - entry.created
                    entry = None
                if entry is not None:
                    entry.leases += 1
                    entry.last_used = now
                    entry.state = PoolState.LEASED
                    break
                building = self._building.get(key)
                builder = building is None
                if building is None:
                    building = self._building[key] = Future()
            if builder:
                entry = self._build(key, factory, building)
                break
            building.result()  # the builder's exception, if it failed; else lease it

        if retired_age is not None:
            self._events.pool_retired(key, retired_age)
        lease = _Lease(self, entry)
        try:
            entry.pool.grant_workers(send_size)
        except BaseException:
            lease()
            raise
        return entry.pool, lease

    @contextmanager
    def lease(
        self, key: Hashable, send_size: int = 1, factory: Factory | None = None
    ) -> Iterator[WorkerPool]:
        """``with manager.lease(key) as pool:`` — `get_pool` that releases itself.

        Uses ``factory`` for a missing pool when given, else `default_factory`.
        """
        pool, done = self.get_pool_with_factory(
            key, send_size, factory if factory is not None else self.default_factory
        )
        try:
            yield pool
        finally:
            done()

    @asynccontextmanager
    async def lease_async(
        self, key: Hashable, send_size: int = 1, factory: Factory | None = None
    ) -> AsyncIterator[WorkerPool]:
        """``async with manager.lease_async(key) as pool:`` — `lease` for asyncio.

        The lease is taken on a thread (`get_pool` may wait while another
        thread builds the key's pool), so the event loop never blocks; it is
        released on the way out, also when the task is cancelled. Use
        ``await pool.run(fn, ...)`` inside.
        """
        import asyncio  # (on first use: the package itself never needs it)

        taken: TakenOnAThread[tuple[WorkerPool, Callable[[], None]]]
        taken = TakenOnAThread(lambda lease: lease[1]())

        def take() -> tuple[WorkerPool, Callable[[], None]] | None:
            lease = self.get_pool_with_factory(
                key, send_size, factory if factory is not None else self.default_factory
            )
            return taken.keep(lease)

        try:
            lease = await asyncio.to_thread(take)
        except asyncio.CancelledError:
            taken.abandon()  # the lease, taken now or later, is released
            raise
        assert lease is not None
        pool, done = lease
        try:
            yield pool
        finally:
            done()

    def _build(self, key: Hashable, factory: Factory, building: Future[None]) -> _PoolEntry:
        try:
            pool = factory(self._pool_size)
            if not isinstance(pool, WorkerPool):
                raise FactoryError(
                    f"the factory for {key!r} returned {type(pool).__name__}, not a "
                    "WorkerPool: return a BaseWorkerPool (or a subclass of it)"
                )
        except BaseException as error:
            with self._lock:
                del self._building[key]
            building.set_exception(error)
            raise
        with self._lock:
            del self._building[key]
            shut_down = self._shut_down
            if not shut_down:
                now = self._clock()
                entry = _PoolEntry(
                    key, pool, created=now, last_used=now, leases=1, serial=next(_serials)
                )
                entry.state = PoolState.LEASED
                self._map.add(entry)
        if shut_down:
            pool.dispose(wait=True)
            shut_down_error = ManagerShutDownError(
                "this WorkerPoolManager is shut down; create a new one"
            )
            building.set_exception(shut_down_error)
            raise shut_down_error
        if pool.name is None:
            with contextlib.suppress(AttributeError):
                pool.name = str(key)
        attach = getattr(pool, "attach_budget", None)  # (BaseWorkerPool, LokyWorkerPool)
        if attach is not None:
            attach(self._budget, self._busy)
        pool.add_idle_callback(functools.partial(self._pool_went_idle, entry))
        building.set_result(None)
        pool.add_worker_event_callback(functools.partial(self._events.worker_lost, key))
        self._supervisor.wake()  # a new retirement deadline (and memory to sample)
        self._events.pool_built(key, pool.max_size)
        return entry

    def _release(self, lease: _Lease) -> None:
        entry = lease._entry
        with self._lock:
            if lease._released:
                return
            lease._released = True
            entry.leases -= 1
            entry.last_used = self._clock()
            if entry.leases > 0:
                return
            if entry.state is PoolState.LEASED:
                entry.state = PoolState.IDLE
            self._map.expires_after_use(entry)
        self._supervisor.wake()

    def _pool_went_idle(self, entry: _PoolEntry) -> None:
        # The pool's last unfinished task just finished: the idle clock starts now.
        with self._lock:
            entry.last_used = self._clock()
            if entry.leases > 0:
                return
            self._map.expires_after_use(entry)
        self._supervisor.wake()

    def _retire_locked(self, entry: _PoolEntry) -> None:
        # Callers log the retirement once the lock is released: a log handler
        # may call back into the manager.
        if self._map.retire(entry):
            self._supervisor.wake()

    # -- the map ---------------------------------------------------------

    def __len__(self) -> int:
        """The number of pools in the map (retiring ones not counted)."""
        return len(self._map.entries)

    def __contains__(self, key: object) -> bool:
        """True if ``key`` has a pool in the map now."""
        try:
            return key in self._map.entries
        except TypeError:
            return False

    def keys(self) -> list[Hashable]:
        """The keys with a pool in the map now."""
        self._check_owner()
        with self._lock:
            return list(self._map.entries)

    # -- the supervisor's checks -----------------------------------------

    def sweep(self) -> SweepResult:
        """Run the supervisor's checks now, on this thread.

        Retires pools older than ``max_pool_lifetime``, removes pools unused
        for ``stale_pool_expiration``, and disposes every removed pool that has
        no lease and no unfinished work (blocking while its workers stop);
        then samples memory if a sample is due (disposing idle pools under
        memory pressure), and rebalances the worker budget if a plan may
        change anything (`WorkerBudget.sweep`). Returns what it did and when
        the next check is due.
        """
        if self._inherited():
            return SweepResult()  # (the parent's pools: nothing to do here)
        started = time.perf_counter()
        with self._lock:
            if self._shut_down:
                return SweepResult()
            now = self._clock()
            plan = self._map.take_due(now)  # retirement and expiry
            self._map.take_retired_done(now, plan)  # retired pools now released and done
            self._disposing_locked(plan.due)
        self._dispose_swept(plan)
        relieved: list[Hashable] = []
        if self._memory.due(now):
            self._memory.sample(now)
            relieved = self._relieve_memory_pressure()
        next_deadline = self._memory.next_deadline(plan.next_deadline, bool(self._map.entries))
        # (A worker leaving to make room for another pool's rebalances the
        # budget itself as it exits; this is a safety net, not a poll.)
        self._budget.sweep()
        with self._lock:
            self._last_sweep = (now, time.perf_counter() - started)
        return SweepResult(
            [key for key, _ in plan.expired],
            [key for key, _ in plan.retired],
            relieved,
            len(plan.due) + len(relieved),
            next_deadline,
        )

    def _dispose_swept(self, plan: _SweepPlan) -> None:
        """Report what a sweep retired and expired, then dispose what it removed."""
        if plan.wake:
            self._supervisor.wake()
        for key, age in plan.retired:
            self._events.pool_retired(key, age)
        for key, unused in plan.expired:
            self._events.pool_expired(key, unused)
        for entry in plan.due:
            self._dispose(entry)

    def _relieve_memory_pressure(self) -> list[Hashable]:
        """Below ``min_available_memory``, dispose idle pools, least recently used first."""
        if self._min_available is None:
            return []
        relieved: list[Hashable] = []
        while (available := memory.available_memory()) < self._min_available:
            with self._lock:
                victim = self._map.take_least_recently_used_idle(available, self._min_available)
                if victim is None:
                    break
                self._disposing_locked([victim])
            self._events.pool_relieved(victim.key, available, self._min_available)
            self._dispose(victim)
            relieved.append(victim.key)
        return relieved

    def _supervised_sweep(self) -> float | None:
        return self.sweep().next_deadline

    def _disposing_locked(self, entries: list[_PoolEntry]) -> None:
        """``entries``, out of the map, are being disposed (holds _lock)."""
        for entry in entries:
            entry.state = PoolState.DISPOSING
            self._disposing.add(entry)

    def _dispose(self, entry: _PoolEntry) -> None:
        # Two threads may dispose one pool (a sweep, and a shutdown that waits
        # for what the sweep is disposing): both wait for it, one reports it.
        entry.end()  # (told why first; a failure is logged)
        with self._lock:
            first = entry.state is not PoolState.DISPOSED
            entry.state = PoolState.DISPOSED
            self._disposing.discard(entry)
        if first:
            self._events.pool_disposed(entry.key)

    # -- stats -----------------------------------------------------------

    def stats(self) -> ManagerStats:
        """A snapshot of every pool: state, workers, leases, work, age, idle time."""
        self._check_owner()
        with self._lock:
            now = self._clock()
            snapshots = [
                PoolSnapshot(
                    e, e.state, e.leases, now - e.created, now - e.last_used, dict(e.memory)
                )
                for e in itertools.chain(self._map.entries.values(), self._map.retiring)
            ]
            shut_down = self._shut_down
            sampled_at = self._memory.sampled_at
            last_sweep = self._last_sweep
        return manager_stats(
            snapshots,
            sampled_at=sampled_at,
            last_sweep=last_sweep,
            budget=self._budget.stats(self._busy),
            shut_down=shut_down,
        )

    # -- shutdown --------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Dispose every pool, leased or not, and stop the supervisor.

        With ``wait``, blocks until accepted work is done and no worker
        process or thread of this manager is left. With ``cancel_futures``,
        tasks that have not started are cancelled first. Later `get_pool`
        calls raise `ManagerShutDownError`. Idempotent.
        """
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        entries = self._close("shut down")
        for entry in entries:
            if cancel_futures:
                entry.pool.shutdown(wait=False, cancel_futures=True)
            else:
                # Signal every pool first, so that their workers stop in parallel.
                entry.pool.dispose(wait=False)
        if wait:
            for entry in entries:
                self._dispose(entry)
            self._supervisor.stop(wait=True)

    def terminate(self) -> None:
        """Stop now: dispose every pool at once, ending the tasks still running.

        Queued tasks are cancelled, running ones fail with
        `PoolTerminatedError`; returns when the workers are gone. Idempotent.
        """
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        entries = self._close("terminated")
        for entry in entries:
            entry.pool.terminate()
            self._dispose(entry)
        self._supervisor.stop(wait=True)

    def shutdown_within(self, grace: float) -> None:
        """Shut down, letting accepted work finish for up to ``grace`` seconds, then terminate."""
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        entries = self._close("shut down")
        for entry in entries:
            entry.pool.dispose(wait=False)
        deadline = time.monotonic() + grace
        while any(e.pool.unfinished_tasks for e in entries) and time.monotonic() < deadline:
            time.sleep(0.01)
        for entry in entries:
            entry.pool.terminate()
            self._dispose(entry)
        self._supervisor.stop(wait=True)

    def _close(self, how: str) -> list[_PoolEntry]:
        """Refuse new leases, stop the supervisor; returns every pool to dispose,
        each told that its manager was ``how`` (`PoolMap.take_all`).

        It does not join the supervisor: a sweep in progress may be disposing
        a pool, and the caller signals every pool (that one too) before it
        waits for anything. Callers that wait join the supervisor last.
        """
        with self._lock:
            self._shut_down = True
            self._worker_options["shared_data"] = None  # (its pools hold theirs)
            ending = self._map.take_all(how)  # (told why once the lock is released)
            entries = [*ending, *self._disposing]  # (those told why already)
            self._disposing_locked(entries)
        self._supervisor.stop(wait=False)
        _live_managers.discard(self)
        if self.handles_signals:
            _signals.release()
        with self._lock:
            holds_server, self._holds_server = self._holds_server, False
        if holds_server:
            _process.release_server()  # stopped once the pools have let it go too
        for entry in ending:
            entry.tell_why()
        return entries

    def __enter__(self) -> WorkerPoolManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # A Ctrl-C leaving the block must not wait for the backlog (as at exit):
        # queued tasks are cancelled and running ones ended.
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else f"{len(self._map.entries)} pools"
        return f"<WorkerPoolManager {state}, pool_size={self._pool_size}>"
