"""pool_manager: keyed, lazily built, self-expiring process pools.

Each key (a tenant, a customer, a data source) gets its own pool of worker
processes, capped at ``pool_size``, built on first use, cached while used,
disposed when it sits unused and retired when it grows old. Every pool is a
``concurrent.futures.Executor``.

How a task and a pool's life flow through the parts::

    caller ──get_pool(key)──▶ WorkerPoolManager ──lease──▶ WorkerPool
      │                       (key → pool map,            (QueuedPool:
      │                        leases, factories)          grant, backpressure)
      │                              ▲                           │ submit
      │                              │ sweep()                   ▼
      │                        Supervisor thread          pending queue ─▶ dispatch
      │                        (expiry, retirement,        (batches, one socket
      │                         process teardown)           per worker; cloudpickle)
      │                              │ dispose()                 │
      │                              ▼                           ▼
      └───────◀── future ◀──── _TaskFuture ◀── I/O loop ◀──── worker processes
                 (callbacks on a callback thread)              (forked from the
                                                               fork server by
                                                               the starter)

- ``manager.py``: the ``_Lease`` objects that keep a pool alive, each
  key's pool built once, and ``sweep()``, which makes every time-driven
  transition. Its parts: ``_lease.py`` (the ``_Lease``), ``_poolmap.py`` (the map of ``_PoolEntry``
  records and their deadlines: what is due to retire or expire),
  ``_records.py`` (the records it keeps and returns), ``_events.py`` (each
  ``PoolEvent``, logged and passed on), ``_sampling.py`` (memory samples),
  ``_stats.py`` (``stats()``).
- ``budget.py``: the worker budget across keys (``max_total_workers``);
  ``_places.py``: the busy places (``max_busy_workers``, `BusySlots`).
- ``supervisor.py``: one daemon thread per manager that runs ``sweep()`` at
  each deadline, and when a lease is released or a pool goes idle.
- ``_queued.py``: ``QueuedPool``, the one base of every pool that queues
  tasks (``BaseWorkerPool``, the Dask pool and the loky pool): admission and backpressure
  (``max_pending``), the grant of workers, the counts, cancel while
  queued, idle callbacks, ``shutdown``; and the base of their futures.
  Only the engine's part (sending, results, ``dispose``) differs.
- ``pool.py``: ``BaseWorkerPool`` (its workers, dispatch, futures, crash
  isolation), and, imported from it, ``WorkerPool`` (what the manager
  needs of a pool) and ``TaskCounts``, which live in
  ``_pool_interface.py``. Its parts, each a module: ``_pool_dispatch.py``
  (dispatch, the caps across keys, ``_finish_tasks``), ``_pool_start.py``
  (worker starts and their retries), ``_pool_io.py`` (what it does on the
  I/O loop, and its ``_Worker`` records), ``_pool_tasks.py`` (its
  futures), ``_pool_main.py`` (which of ``__main__``'s objects travel by
  reference), ``_pool_registry.py`` (the process's pools, for the exit and
  fork hooks).
- ``dask.py``: ``DaskWorkerPool``, a key's pool on a Dask cluster (a
  ``QueuedPool`` too; optional, and imported by nothing else).
- ``loky.py``: ``LokyWorkerPool``, a key's pool of loky workers, each a
  one-worker loky executor (a ``QueuedPool`` too; optional, and imported by
  nothing else); its parts (what runs in a loky worker, its records) are
  ``_loky_slots.py``, and its ``shared_data`` (one named shared-memory
  segment, mapped read-only by each loky worker) ``_loky_shared.py``.
- ``_dispatch.py``: dispatch decisions as pure functions (a task's kind, each
  kind's run time, how many tasks a worker is handed at once).
- ``_map.py``: ``map`` for every pool (ordered or in completion order,
  chunked, lazy where it must be), shared by ``BaseWorkerPool``, the Dask
  pool and the loky pool; ``_map_methods.py``: the map methods every pool
  has (``map``, ``imap``, ``imap_unordered``, ``starmap``,
  ``starmap_unordered``), each a call of the engine's ``_map_calls``.
- ``_compat.py``: what ``ProcessPoolExecutor`` code expects beyond
  ``Executor`` (``mp_context``, the ``_processes`` view of the workers).
- ``_io_loop.py``: the process's one I/O loop, which serves every pool's
  worker sockets and status pipes, and its deadlines.
- ``_starter.py``: the process's worker starter (fork-server round trips,
  off every pool's lock, and the retries after a failed start).
- ``_process.py``: the fork server that starts workers.
- ``_main_module.py``: the main script's module in the workers (the fork
  server imports it as ``__mp_main__``), and which of ``__main__``'s
  functions and classes travel by reference to it.
- ``_worker.py``: what runs in a worker (its loop, the watchdog that ends it
  with the fork server), and how a pool sets a worker up (``INIT``).
- ``_native_threads.py``: ``native_threads``, each worker's BLAS and OpenMP
  threads: the variables set in its environment, and threadpoolctl for the
  libraries loaded before it started (by the main module, in the fork server).
- ``_protocol.py``: the wire, in one place: every frame, message kind and
  reason code between a pool, the fork server and its workers, the
  ``Message`` records a pool reads, and the task envelope (how a call, a
  result and an error are pickled, and loaded again).
- ``_shared.py``: a pool's shared data (``shared_data=``): pickled once
  in the parent, its buffers in segments the pool (or the manager) holds,
  sent with each worker's ``INIT``, loaded once in the worker from
  read-only mappings; and `shared_data`, which returns it there.
- ``_shared_array.py``: `shared_array`, a numpy array made in a memfd
  from the start, which ``_buffers`` sends as it is (its own segment: no
  copy, no content check).
- ``_buffers.py``: large buffers out of band (numpy arrays' data, large
  ``bytes``): each written once into a memfd segment whose descriptor
  travels with the message, mapped by the reader; the parent's segments
  live while an unfinished task holds them, and are reused while their
  content is unchanged.
- ``_threads.py``: the threads that must never stall (the I/O loop, the
  starter, the callback threads, the supervisor, any running event loop):
  backpressure never holds a ``submit`` there, and no callback can end
  them; and `CallbackRunner`, where user callbacks run.
- ``errors.py``: every error a user can meet.

Data flows one way (caller → manager → pool → worker → future), and
so do lifecycle decisions (supervisor → manager map → ``pool.dispose()``),
and imports: no module imports one that imports it back, at its top or in a
function (``tests/test_layout.py``). At the bottom, ``_protocol`` imports
nothing of the package at its top (nor do ``_buffers`` and
``_native_threads``); ``_shared`` imports only ``_protocol`` and
``_buffers``, ``_worker`` only those four, and the fork server
(``_process``) imports them; ``_shared_array`` imports only ``_buffers``.

Threads, and what each may change (a process has one I/O loop, one
starter and a few callback threads however many pools it has):

- *Callers* (the application's threads): a pool's queue, counts and
  futures, and its dispatch (under the pool's ``_lock``), which never
  blocks: a worker to start is asked of the starter, tasks go out by a
  non-blocking send (what does not fit is the I/O loop's to send); while
  the I/O loop is in a round, a submit leaves its dispatch to that round
  (``_dispatch_soon``: batches, and no system call to hand the GIL back
  and forth); the manager's map and leases (under its ``_lock``); the
  budget (``submitted``).
- *The I/O loop* (``pool_manager-io``, while any pool has a worker): alone
  reads every pool's worker sockets and status pipes, and writes what a
  send left over (its selector, each ``_Worker``'s reader); under a pool's lock, settles that
  pool's tasks (without running their done-callbacks), ends workers past a
  deadline, ``kill_worker_memory`` or ``idle_timeout``, and dispatches;
  runs a manager's idle callback (quick, never waits); tells the budget,
  which may then change *other* pools' allowances (each pool's lock taken
  in turn, never two at once). No user code runs here.
- *The starter* (``pool_manager-starter``, while a start or a retry is
  due): the fork-server round trips, with no pool lock held; then, under
  the pool's lock, files the new worker and dispatches, or counts the
  failure. No user code runs here either.
- *The callback threads* (``pool_manager-callbacks``, up to 4, more only
  while all are stuck): done-callbacks and worker-event callbacks, each
  pool's one at a time and in order (`_threads.CallbackRunner`), and the
  last hold on the fork server (which waits for it to exit).
- *The supervisor* (one per manager): ``sweep()``: expiry, retirement,
  disposal (pool locks in turn, never under the manager's), memory samples,
  rebalancing.
- *The SIGTERM drainer* (one per process, with a manager that handles
  signals): the graceful drain, then ``terminate``.
- *A Dask client's event loop*: settles a `DaskWorkerPool`'s futures.
- *A loky executor's manager thread* (one per worker of a `LokyWorkerPool`):
  settles that worker's tasks and hands it the next (under the pool's lock,
  never waiting); a slot's start and shutdown run on the callback threads.
- *The loky watch* (``pool_manager-loky-watch``, one per process, only
  while a `LokyWorkerPool` has a deadline or a memory limit to watch):
  calls each watched pool's ``_watch`` with no lock of its own held (the
  pool takes its ``_lock``, never waiting), which ends slots past a task's
  deadline or ``kill_worker_memory`` (``_loky_watch.py``).
- *Finalizers* (a dropped manager or pool, on whichever thread collects
  it): only what never waits: a ``SimpleQueue.put``, a wake-up byte behind
  a lock taken without blocking, a list append; a shared-memory segment
  nobody holds closes its descriptor.

Locks, outermost first (a thread holding one may take those after it, never
those before): a pool's ``_dispose_lock``; the manager's ``_lock`` (never
held while a pool is called, so it stands alone); a pool's ``_lock``; the
worker budget's and `BusySlots`' locks, the I/O loop's, the starter's, the
callback runner's, the live segments' (``_buffers``) and the loky watch's
(innermost: nothing is called under them). The fork
server's lock and the process's ``_server_lock`` are taken by the starter
and a disposal with no pool lock held. The budget tells pools of a new
allowance with no lock of its own held.

Every wait, and who ends it (on every path, errors included):

- ``submit`` blocked by backpressure (a pool's ``_not_full``,
  `QueuedPool._wait_for_room`): a task finishing (`_finish_tasks`, or the
  Dask pool's ``_finish``, through `QueuedPool._count_finished`), a grant
  of more workers, shutdown; ``map``'s deadline. Never on a thread that
  must not stall (``_threads.py``).
- ``dispose`` waiting for unfinished work (``_drained``): the last task
  leaving the pool's books, which every path (result, failure, cancel,
  kill, a lost worker) does through `_finish_tasks`; then for its last
  worker (``_io_done``): the I/O loop once no worker is left, the starter
  once no start is under way. Never waits on a service thread. (A
  `LokyWorkerPool`'s: its futures all settled and no slot start under
  way, signalled by whoever settles the last or ends the start; then its
  slots' shutdowns, signalled as each ends; not at all on a loky manager
  thread, which a shutdown would wait for.)
- a task stuck past its deadline, or a worker past ``kill_worker_memory``:
  the I/O loop, which wakes for the pool's next deadline and every 50 ms
  for memory, and kills the worker (nothing inside the worker is relied on).
  A `LokyWorkerPool`'s: the loky watch (its ``_woken`` condition: a pool
  that hands a slot a task with a deadline, or a task under the memory
  limit, or settles such a task; else the next deadline, or 50 ms for
  memory), which ends the slot's executor with its worker.
- the starter (its ``_wanted`` condition): a start asked for, a retry due.
- the I/O loop (its selector): a worker's message or exit, a pool's change
  (its wake-up pipe), a pool's next deadline.
- a callback thread (the runner's ``_work``): a callback to run; it ends
  after ``IDLE_EXIT`` seconds with none.
- ``get_pool`` waiting for another thread's build of the key's pool (a
  ``Future``): the builder, on every path.
- the supervisor (its ``_wakeups`` queue): a lease released, a pool idle, a
  pool built or retired, shutdown, its manager collected; else its next
  deadline.
- a pool waiting for a worker or a place under the caps across keys: no
  thread waits; the task stays queued, and the budget (``budget.py``) and
  `BusySlots` (``_places.py``) hand allowance and places on as tasks finish
  and workers exit.
  Their decision logic is tested as a state machine
  (``tests/test_budget_model.py``).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._platform import DEFAULT_ENGINE
    from ._shared import shared_data, worker_index
    from ._shared_array import shared_array
    from .errors import (
        ArgumentUnpicklingError,
        EngineUnavailableError,
        FactoryError,
        ForkServerError,
        ManagerShutDownError,
        PoolManagerError,
        PoolShutDownError,
        PoolTerminatedError,
        ResultTimeoutError,
        ResultUnpicklingError,
        TaskKilledError,
        TaskTimeoutError,
        TaskUnpicklingError,
        UsedAfterForkError,
        WorkerLostError,
        WorkerMemoryError,
        WorkerPoolBrokenError,
        WorkerStartError,
    )
    from .manager import (
        Factory,
        ManagerStats,
        PoolEvent,
        PoolState,
        PoolStats,
        SweepResult,
        WorkerPoolManager,
    )
    from .pool import DEFAULT_IDLE_TIMEOUT, BaseWorkerPool, TaskCounts, WorkerPool
    from .progress import as_completed

logging.getLogger("pool_manager").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ArgumentUnpicklingError",
    "DEFAULT_ENGINE",
    "DEFAULT_IDLE_TIMEOUT",
    "BaseWorkerPool",
    "EngineUnavailableError",
    "Factory",
    "FactoryError",
    "ForkServerError",
    "ManagerShutDownError",
    "ManagerStats",
    "PoolEvent",
    "PoolManagerError",
    "PoolShutDownError",
    "PoolTerminatedError",
    "PoolState",
    "PoolStats",
    "ResultTimeoutError",
    "ResultUnpicklingError",
    "SweepResult",
    "TaskCounts",
    "TaskKilledError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "UsedAfterForkError",
    "WorkerPool",
    "WorkerLostError",
    "WorkerMemoryError",
    "WorkerPoolBrokenError",
    "WorkerPoolManager",
    "WorkerStartError",
    "__version__",
    "as_completed",
    "shared_array",
    "shared_data",
    "worker_index",
]

#: Where each public name lives. They are imported on first use: the fork
#: server (``_process.py``) imports this package to reach its own module and
#: ``_worker``, and should not pay for the manager, the pools and psutil.
_HOMES = {
    "ArgumentUnpicklingError": "errors",
    "EngineUnavailableError": "errors",
    "FactoryError": "errors",
    "ForkServerError": "errors",
    "ManagerShutDownError": "errors",
    "PoolManagerError": "errors",
    "PoolShutDownError": "errors",
    "PoolTerminatedError": "errors",
    "ResultTimeoutError": "errors",
    "ResultUnpicklingError": "errors",
    "TaskKilledError": "errors",
    "TaskTimeoutError": "errors",
    "TaskUnpicklingError": "errors",
    "UsedAfterForkError": "errors",
    "WorkerLostError": "errors",
    "WorkerMemoryError": "errors",
    "WorkerPoolBrokenError": "errors",
    "WorkerStartError": "errors",
    "Factory": "manager",
    "ManagerStats": "manager",
    "PoolEvent": "manager",
    "PoolState": "manager",
    "PoolStats": "manager",
    "SweepResult": "manager",
    "WorkerPoolManager": "manager",
    "DEFAULT_IDLE_TIMEOUT": "pool",
    "BaseWorkerPool": "pool",
    "TaskCounts": "pool",
    "WorkerPool": "pool",
    "as_completed": "progress",
    "shared_data": "_shared",
    "worker_index": "_shared",
    "shared_array": "_shared_array",
    "DEFAULT_ENGINE": "_platform",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
