"""A pool of worker processes for one key: ``BaseWorkerPool``, the
implementation of the ``WorkerPool`` interface (``_pool_interface.py``;
imported from here, as ``TaskCounts`` is).

A pool knows nothing of keys, leases or expiry (that is the manager's job).
It owns: its worker processes (forked from the fork server, ``_process.py``),
how many of them it may run (``grant_workers``, the worker budget), its queue
of tasks, backpressure, and the futures it hands out.

``BaseWorkerPool`` is made of parts, a module each, that share its state
(made and described in its ``__init__``; what changes, under its ``_lock``):

- ``_queued.py`` (its base, `QueuedPool`, shared with the Dask pool):
  admission and backpressure, the grant, the counts, cancel while queued,
  idle callbacks, ``shutdown``;
- this module: its constructor, the rest of the ``WorkerPool`` and
  ``Executor`` methods (``submit``, ``kill_task``, ``terminate``,
  ``dispose``; ``_map_calls``, the engine of the map methods, which
  ``_map_methods.py`` holds), its checks after a fork, and the hooks
  `QueuedPool` asks of an engine;
- ``_pool_dispatch.py`` (the mixin `_Dispatch`): dispatch, the pool's side
  of the caps across keys (the worker budget, the busy places), and
  ``_finish_tasks``, through which every task leaves the pool's books;
- ``_pool_start.py`` (`_WorkerStarts`): worker starts on the starter, their
  retries after a failure (``START_RETRY_*``), the hold on the fork server;
- ``_pool_io.py`` (`_WorkerIO`, and the records `_Worker` and `_Remains`):
  what runs on the I/O loop;
- ``_pool_main.py`` (`_MainModuleRefs`): which of ``__main__``'s objects
  travel by reference (the fork server's report of the main module);
- ``_pool_tasks.py``: the future ``submit`` returns (`_TaskFuture`, a
  `_queued._QueuedFuture`);
- ``_pool_registry.py``: the process's pools, for the exit and fork hooks.

How a task travels::

    submit ──▶ pending queue ──▶ dispatch ──▶ worker socket ──▶ worker
      │        (cancellable)     (a batch     (one message      (runs the batch
      │                           per worker)  per batch)        in order)
      ▼                                                             │
    future ◀──── the I/O loop ◀──────────── one message per result ◀─┘
      │          (settles it)
      └─▶ done-callbacks, on the pool's strand of the callback threads

Dispatch runs wherever something changes (a submit, a result, a worker
start or exit) under the pool's lock, and never blocks: sockets are
non-blocking, what does not fit is flushed by the I/O loop, and a worker
to start is asked of the process's starter (`_starter.py`), which makes the
fork-server round trip with no pool lock held and hands the worker back
(`_worker_started`, ``_pool_start.py``) with its first batch, taken from
the queue when it was asked for. When tasks queue up, a worker gets
several in one message, and a few more than it is running (enough for
about 2 ms of work, by the measured task time), so that it never
waits for the parent between tasks.

One I/O loop serves every pool of the process (`_io_loop.py`): a pool with
live workers is attached to it, and the loop reads results, flushes output,
learns of worker exits from the fork server's status pipes, ends workers
past a deadline or ``kill_worker_memory``, and retires workers idle past
``idle_timeout``. A worker that dies takes only the task it was running;
the tasks sent to it but not started go back to the front of the queue.

A worker that cannot start (the system is out of descriptors, processes or
memory) is tried again with a back-off (the starter calls the pool back,
`_start_retry_due`, ``_pool_start.py``): nothing sleeps under the pool's
lock, and ``submit`` never waits for it. When it gives up, the queued tasks
that no live worker of the pool can take fail with `WorkerStartError`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import _process, _threads
from ._buffers import share
from ._compat import ProcessView, resolve_start_method
from ._dispatch import RunTimes, task_kind
from ._durations import Duration, memory_limits, to_count, to_seconds
from ._main_module import main_to_import
from ._map import MapInput, map_lazily
from ._native_threads import NativeThreads, ThreadLimit
from ._places import grant_places
from ._platform import check_fork_server
from ._pool_dispatch import _Dispatch
from ._pool_interface import TakenOnAThread as TakenOnAThread
from ._pool_interface import TaskCounts, WorkerPool
from ._pool_io import MAX_ATTEMPTS as MAX_ATTEMPTS
from ._pool_io import MEMORY_CHECK_INTERVAL as MEMORY_CHECK_INTERVAL
from ._pool_io import _Remains, _Worker, _WorkerIO
from ._pool_main import _MainModuleRefs, _MainReportNotIn
from ._pool_registry import _all_pools, _busy_pools, _live_pools
from ._pool_start import START_RETRY_FIRST as START_RETRY_FIRST
from ._pool_start import START_RETRY_MAX as START_RETRY_MAX
from ._pool_start import START_RETRY_WINDOW as START_RETRY_WINDOW
from ._pool_start import _Start, _StartTrouble, _WorkerStarts
from ._pool_tasks import _TaskFuture
from ._protocol import WithBuffers, dump_call
from ._queued import QueuedPool
from ._shared import SharedData
from ._worker import (
    WorkerConfig,
    WorkerLimits,
    check_hook,
    dump_config,
    run_chunk,
    run_chunk_single,
    worker_env,
)
from .errors import PoolShutDownError, TaskKilledError, UsedAfterForkError
from .progress import ProgressOption

if TYPE_CHECKING:
    from .budget import BusySlots, WorkerBudget

__all__ = ["DEFAULT_IDLE_TIMEOUT", "BaseWorkerPool", "TaskCounts", "WorkerPool"]

# Also imported from here (``import X as X`` above): `TakenOnAThread` (by the
# manager), and the parts' constants, to read. ``START_RETRY_*`` and
# ``MEMORY_CHECK_INTERVAL`` are read where they live (``_pool_start.py``,
# ``_pool_io.py``): a test changes them there.

T = TypeVar("T")
P = ParamSpec("P")

logger = logging.getLogger("pool_manager")

#: Seconds an idle worker process waits for work before it exits; the next
#: submit starts it again. ``None`` keeps workers until the pool is disposed.
DEFAULT_IDLE_TIMEOUT: float = 300.0


class BaseWorkerPool(_MainModuleRefs, _Dispatch, _WorkerStarts, _WorkerIO, QueuedPool[_TaskFuture]):
    """A process pool for one key, and a drop-in ``ProcessPoolExecutor``.

    ``BaseWorkerPool(4)`` behaves like ``ProcessPoolExecutor(4)``: up to four
    worker processes, started as tasks find none idle, fed in order.
    Submissions travel with cloudpickle, so lambdas and closures work; the
    main script's functions and classes travel by reference to the script's
    module, which the workers import (``_main_module.py``; by value where
    they cannot, or when the function reads what only the script's
    ``if __name__ == '__main__':`` block sets).

    Args:
        max_size: the most worker processes (``ProcessPoolExecutor``'s
            ``max_workers``, which is accepted as another name for it).
            Default: the CPUs this process may use.
        initializer, initargs: run ``initializer(*initargs)`` once in each
            worker process, to give it its own state (a model, a connection).
            When they hold a function or class of the main script, the pool
            starts the fork server as it is built, and waits for it to
            import the script (see `submit`). A task or the initializer
            reads the worker's index in the pool with `pool_manager.worker_index`.
        finalizer, finalargs: run ``finalizer(*finalargs)`` in a worker as it
            leaves cleanly (idle past ``idle_timeout``, recycled, retired by
            the caps across keys, or at shutdown), e.g. to flush or close
            what the initializer opened; not in a worker that is ended (a
            deadline, ``kill_task``, ``terminate``) or dies. What it raises
            is written to the worker's stderr. Shutdown waits for it, as for
            a task.
        mp_context: accepted for ``ProcessPoolExecutor`` compatibility (a
            start method name or ``multiprocessing`` context, checked); every
            worker is forked from the fork server whatever it names, so a
            worker never inherits the parent's threads or state.
        max_pending: backpressure. ``None`` (the default) never blocks, like
            ``ProcessPoolExecutor``; an int ``n`` blocks ``submit`` while the
            granted workers are busy and ``n`` more tasks wait (but for a
            submit from a done-callback or an event loop: see `submit`).
        idle_timeout: seconds an idle worker waits before it exits (it is
            started again on demand); ``None`` keeps workers alive. Any
            finite positive duration works.
        env: environment variables (str to str) set in each worker before
            its initializer and tasks run (and before they import anything),
            over the parent's environment. Each worker starts in the
            parent's working directory and environment as they are when it
            starts, as ``ProcessPoolExecutor``'s workers do.
        max_tasks_per_worker: a worker is replaced (cleanly, between tasks)
            after this many tasks. ``max_tasks_per_child`` is accepted as
            another name for it, as ``ProcessPoolExecutor`` calls it.
        max_worker_memory: bytes, or a string like ``"512MB"``: a worker whose
            resident memory is above this after a task is replaced, and no
            task fails.
        kill_worker_memory: a hard limit above ``max_worker_memory``: a worker
            above it is ended at once (checked every 50 ms) and only its task
            fails, with `WorkerMemoryError`.
        task_timeout: seconds a task may run; past that its worker is ended
            and its future fails with `TaskTimeoutError`. Per call:
            `submit_with_timeout`. In `map`, each call's, in a chunk too.
        shared_data: one large read-only object for every worker (arrays, a
            model), pickled once, its buffers in shared memory the pool holds;
            each worker loads it once, before its initializer, and a task gets
            it with `pool_manager.shared_data` (an array: a read-only view).
        native_threads: each worker's BLAS and OpenMP threads (numpy's matrix
            products), so that ``max_size`` workers do not each run one per
            CPU: ``"auto"`` (the default), ``max(1, CPUs // max_size)`` for
            each of ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``... that the
            worker's environment (this process's, ``env`` on top) does not
            set (a BLAS one follows a set ``OMP_NUM_THREADS``); an int: that
            many, for each ``env`` does not name; ``None``: left alone. They
            are set before anything is imported; libraries loaded before (by
            the main module, in the fork server) are limited with
            threadpoolctl if it is installed (the ``threads`` extra).

    Raises:
        TypeError, ValueError: arguments of the wrong type or range, or that
            cannot be pickled (``initializer``, ``initargs``, ``shared_data``).
        OSError: ``shared_data``'s buffers could not be put in shared memory.
        EngineUnavailableError: the fork server cannot run on this platform
            (see ``_platform.py``): use `pool_manager.loky.LokyWorkerPool`.
    """

    def __init__(
        self,
        max_size: int | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[Any, ...] = (),
        mp_context: object = None,
        max_pending: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        env: dict[str, str] | None = None,
        max_tasks_per_worker: int | None = None,
        max_tasks_per_child: int | None = None,
        max_worker_memory: int | str | None = None,
        kill_worker_memory: int | str | None = None,
        task_timeout: Duration | None = None,
        shared_data: object = None,
        native_threads: NativeThreads = "auto",
    ) -> None:
        check_fork_server()
        _process.check_not_importing_main()
        if max_size is not None and max_workers is not None:
            raise TypeError("give max_size or its alias max_workers, not both")
        size = max_size if max_size is not None else max_workers
        if size is None:
            size = _process.cpu_count()
        elif isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"max_workers must be an int, not {type(size).__name__}")
        elif size <= 0:
            raise ValueError("max_workers must be greater than 0")
        check_hook("initializer", initializer, initargs)
        check_hook("finalizer", finalizer, finalargs)
        self._env = worker_env(env)
        self._threads = ThreadLimit.of(native_threads, size, _process.cpu_count())
        if max_pending is not None:
            to_count("max_pending", max_pending, minimum=0)
        if max_tasks_per_worker is not None and max_tasks_per_child is not None:
            raise TypeError("give max_tasks_per_worker or its alias max_tasks_per_child, not both")
        max_tasks = (
            max_tasks_per_worker if max_tasks_per_worker is not None else max_tasks_per_child
        )
        if max_tasks is not None:
            to_count("max_tasks_per_worker", max_tasks, minimum=1)
        soft_memory, hard_memory = memory_limits(max_worker_memory, kill_worker_memory)
        self._limits = WorkerLimits(max_tasks, soft_memory)
        self._kill_memory = hard_memory
        self._next_memory_check = 0.0  # time.monotonic(), for kill_worker_memory
        self._task_timeout = to_seconds("task_timeout", task_timeout, allow_none=True)
        self._idle_timeout = to_seconds("idle_timeout", idle_timeout, allow_none=True)
        self._start_method = resolve_start_method(mp_context)

        # The queue, its lock and conditions, the counts and the grant (_drained:
        # waiters for no unfinished task); _lock guards them and everything below.
        QueuedPool.__init__(self, size, max_pending)
        #: Waiters for the last worker to be gone (none starting, none attached to the loop).
        self._io_done = threading.Condition(self._lock)
        self._outstanding: dict[int, _TaskFuture] = {}  # unfinished, by task id
        self._workers: dict[int, _Worker] = {}  # live (leaving included), by pid
        self._task_ids = itertools.count(1)
        self._kills: dict[int, int] = {}  # pid -> id of the task kill_task killed it for
        self._exit_reasons: dict[int, str] = {}  # pid -> why it left cleanly, until asked
        self._fruitless = 0  # workers in a row that ended without finishing a task
        #: Each kind of task's run time (see _dispatch).
        self._estimates = RunTimes()
        self._terminating = False
        self._worker_event_callbacks: list[Callable[[str, int, str], object]] = []
        self._worker_events: list[tuple[str, int, str]] = []  # to emit outside _lock
        self._budget: WorkerBudget | None = None  # see attach_budget
        #: time.monotonic() of the last submit (the budget's "least recently used").
        self.last_submit = 0.0
        self._allowed: int | None = None  # the budget's allowance (None: no budget)
        self._busy_slots: BusySlots | None = None  # max_busy_workers (see attach_budget)
        self._places_to_return = 0  # places of workers that went idle, to give back
        #: The fork server this pool holds (see _process), its workers and its
        #: token in the I/O loop: the finalizer lets go of them.
        self._remains = _Remains(self._workers)
        weakref.finalize(self, self._remains.collected).atexit = False
        self._io_token: int | None = None  # attached to the I/O loop (while it has workers)
        self._disposal_waits = False  # a dispose(wait=True) is under way
        self._io_changes: list[_Worker] = []  # for the I/O loop: new, or output waiting
        #: Workers asked of the starter (`_request_start`) and not yet here,
        #: in the order asked; they count as live.
        self._starts: deque[_Start] = deque()
        #: Workers failing to start (see _start_failed); None while they start.
        self._start_trouble: _StartTrouble | None = None
        #: This pool's done-callbacks and worker events, run in order off the
        #: service threads (`_threads.CallbackRunner`).
        self._strand = _threads.Strand()
        #: Tasks failed under _lock with no thread to finish them (none could
        #: start): whoever releases the lock next finishes them.
        self._undelivered: list[tuple[_TaskFuture, bool | None, Any]] = []
        #: The process that built it: in a process forked from that one, the
        #: pool is inert (see _pool_registry._inert_in_forked_child).
        self._owner_pid = os.getpid()
        #: The workers import the main module: __main__'s objects may travel
        #: by reference (see _main_module; by value where this is False).
        self._main_importable = main_to_import() is not None
        #: The shared data's pickle and segments, held until the pool is disposed.
        self._shared = SharedData.of(shared_data, self._by_reference())
        config = WorkerConfig(
            self._limits,
            initializer,
            initargs,
            bytes(multiprocessing.current_process().authkey),
            None if self._shared is None else self._shared.spec,
            finalizer,
            finalargs,
        )
        try:
            self._config = dump_config(config, self._by_reference())
        except Exception as error:
            raise TypeError(
                f"the initializer, finalizer and their arguments must be picklable: {error}"
            ) from error
        _all_pools.add(self)

    # -- after a fork ------------------------------------------------------

    def _inherited(self) -> bool:
        """True in a process forked from the one that built the pool (it is inert there)."""
        return os.getpid() != self._owner_pid

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            raise UsedAfterForkError.for_object("pool", self._owner_pid)

    def _close_inherited(self) -> None:
        """(In a forked child, no lock taken) close the copies of the parent's descriptors."""
        for worker in list(self._workers.values()):
            with contextlib.suppress(OSError):
                worker.sock.close()
            if not worker.status_done:
                with contextlib.suppress(OSError):
                    os.close(worker.status_fd)

    # -- WorkerPool ------------------------------------------------------

    # (max_size, max_pending, worker_count, grant_workers, unfinished_tasks,
    # unfinished_maps, add_idle_callback, task_counts, is_shut_down and
    # shutdown: `QueuedPool`'s.)

    def worker_pids(self) -> list[int]:
        if self._inherited():
            return []  # (the parent's workers)
        with self._lock:
            return list(self._workers)

    def add_worker_event_callback(self, callback: Callable[[str, int, str], object]) -> None:
        with self._lock:
            self._worker_event_callbacks.append(callback)

    def worker_exit_reason(self, pid: int) -> str | None:
        with self._lock:
            return self._exit_reasons.pop(pid, None)

    def _emit_worker_events(self) -> None:
        if _threads.on_service_thread():
            if self._worker_events:
                _threads.get_runner().run(self._strand, self._emit_worker_events)
            return
        with self._lock:
            events, self._worker_events = self._worker_events, []
            callbacks = list(self._worker_event_callbacks)
        self._log_setup_failure()  # (a worker's failed initializer: once, see QueuedPool)
        for kind, pid, reason in events:
            logger.debug("worker %d: %s (%s)", pid, kind, reason)
            for callback in callbacks:
                # A listener's bug must not fail tasks, nor end a callback thread.
                _threads.call_guarded(
                    callback, kind, pid, reason, failed="a worker event callback failed"
                )

    def release_idle_resources(self) -> bool:
        """Let go of the fork server once every worker has exited and no task waits.

        (The pool leaves the I/O loop by itself when its last worker exits.)
        An idle pool then costs only its Python objects; the next submit
        starts workers again. Returns True if anything was released.
        """
        if self._inherited():
            return False
        with self._lock:
            if self._outstanding or self._workers or self._starts:
                return False
        return self._drop_server()

    # ProcessPoolExecutor's private views of its workers, which code (and
    # CPython's own tests) read.

    @property
    def _max_workers(self) -> int:
        return self._max_size

    @property
    def _processes(self) -> dict[int, ProcessView]:
        """The workers that take tasks, by pid (as ``ProcessPoolExecutor._processes``)."""
        with self._lock:
            return {
                pid: ProcessView(worker)
                for pid, worker in self._workers.items()
                if worker.leaving is None
            }

    # -- Executor --------------------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker process.

        Returns a ``concurrent.futures.Future``. Blocks while the pool is full
        (only when ``max_pending`` is set), but never on a thread that must
        not stall: the library's callback threads (where done-callbacks run), a
        manager's supervisor (where ``on_event`` may run) or a thread running
        an asyncio event loop (``loop.run_in_executor``). There the task is
        admitted at once, beyond ``max_pending``: waiting would hold up the
        thread that makes room, or the whole event loop. The first submit
        starts a worker process (a few milliseconds: it is forked from the
        fork server). The first task that holds a function or class of the
        main script waits for the fork server to have imported the script
        (its top level, once per server; not on an event loop's thread:
        ``run`` submits it from another thread). If no worker can start
        (see `START_RETRY_WINDOW`), the future fails with `WorkerStartError`;
        ``submit`` itself does not wait for the retries.

        Raises:
            TypeError: ``fn`` is not callable.
            PoolShutDownError: (a ``RuntimeError``) the pool is shut down.
        """
        future = self._submit(self._task_timeout, fn, args, kwargs)
        assert future is not None
        return future

    def _submit_nowait(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[T] | None:
        return self._submit(self._task_timeout, fn, args, kwargs, block=False)

    def submit_with_timeout(
        self, timeout: Duration | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """`submit` with a deadline: ``timeout`` seconds once the task starts.

        A task still running then has its worker ended; its future fails with
        `TaskTimeoutError` and the pool's other tasks are unaffected.
        ``None`` means no deadline (the pool's ``task_timeout`` is not used).
        """
        seconds = to_seconds("timeout", timeout, allow_none=True)
        future = self._submit(seconds, fn, args, kwargs)
        assert future is not None
        return future

    def _submit(
        self,
        timeout: float | None,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        block: bool = True,
        deadline: float | None = None,
    ) -> Future[T] | None:
        """Submit; with ``block`` False, None instead of waiting for room, or for
        the fork server's report on the main module (the first task with an
        object of ``__main__``, see `_main_by_reference`).

        ``deadline`` (a ``time.monotonic()`` time): wait for room until then,
        and raise ``TimeoutError`` if the pool is still full.
        """
        self._check_owner()
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        main = None
        if self._main_importable:
            main = self._main_by_reference if block else self._main_by_reference_now
        try:
            payload = dump_call(fn, args, kwargs, main)
            if type(payload) is WithBuffers:  # (its large buffers, to shared memory)
                payload = WithBuffers(payload.data, share(payload.buffers, copy=True))
        except _MainReportNotIn:
            return None  # (submitted on a thread instead, where waiting is fine)
        except Exception as error:
            # As ProcessPoolExecutor: a task that cannot be pickled fails its future.
            if self._shut_down:
                raise PoolShutDownError(self._refusal) from None
            failed: Future[T] = Future()
            failure = error
            if not isinstance(error, pickle.PicklingError):
                failure = pickle.PicklingError(f"could not pickle the task: {error}")
                failure.__cause__ = error
            failed.set_exception(failure)
            return failed
        kind = task_kind(fn, args)
        with self._lock:
            if not self._admit(deadline, block):
                return None
            task_id = next(self._task_ids)
            self.last_submit = time.monotonic()
            future = _TaskFuture(self, task_id, payload, timeout)
            future.kind = kind
            self._outstanding[task_id] = future
            if len(self._outstanding) == 1:
                _busy_pools.add(self)  # (kept alive while it has work)
            self._enqueue(future)
            budget = self._budget
            # Under a budget, a pool that could use another worker asks for
            # it before dispatching: else its workers would take every task
            # queued (prefetch) and it would never grow.
            # (Only while its demand, min(granted, unfinished), grows: past
            # that, the budget hears of the pool as its tasks finish.)
            ask = (
                budget is not None
                and len(self._outstanding) <= self.worker_count
                and self._wants_workers()
            )
            if not ask:
                self._dispatch_soon()
        if ask:
            assert budget is not None
            budget.submitted(self, True)
            with self._lock:
                self._dispatch()
        self._after_unlock()
        return future

    def kill_task(self, future: Future[Any]) -> bool:
        """Stop a task now: cancel it if it has not started, else kill its worker.

        Killing the worker fails only that task, with `TaskKilledError`; the
        pool starts a replacement and its other tasks are unaffected (those
        sent to that worker but not started go back to the queue). Returns
        False if the task had already finished.

        Raises:
            ValueError: ``future`` did not come from this pool's ``submit``.
        """
        self._check_owner()
        if not isinstance(future, _TaskFuture) or future._pool_ref() is not self:
            raise ValueError("kill_task takes a future returned by this pool's submit()")
        if future.cancel():
            return True
        with self._lock:
            if future.done() or future._dropped:
                return False
            for worker in self._workers.values():
                if future in worker.assigned:
                    if worker.assigned[0] is future:
                        # It is running (or about to): end its worker.
                        self._kills[worker.pid] = future.task_id
                        _process.kill_worker(worker.pid)
                        return True
                    break
            # Sent to a worker behind another task, where it can no longer be
            # taken back: fail it now and drop whatever it does later.
            future._dropped = True
            self._outstanding.pop(future.task_id, None)
        error = TaskKilledError(
            "the task was killed before it started; it may still run once in a worker, "
            "and that result is dropped"
        )
        self._finish_tasks([(future, False, error)])
        return True

    def terminate(self) -> None:
        """Stop now: cancel queued tasks, end the workers, and return when they are gone.

        Tasks that were running fail with `PoolTerminatedError` (they are not
        sent again). Idempotent; `submit` afterwards raises.
        """
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        self._cancel_queued(terminate=True)  # (and no more dispatch: _stop_dispatch)
        with self._lock:
            pids = list(self._workers)
        for pid in pids:
            _process.kill_worker(pid)
        self.dispose(wait=True)

    def _map_calls(
        self,
        fn: Callable[..., Any],
        inputs: MapInput,
        *,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        progress: ProgressOption,
        return_exceptions: bool,
    ) -> Iterator[Any]:
        """Every map method's engine (see `MapMethods.map`): a chunk runs as
        `run_chunk`, whose worker reports each call in a task with a deadline."""
        runner = run_chunk if inputs.starred else run_chunk_single
        catch = (True,) if return_exceptions else ()
        return map_lazily(
            fn,
            inputs,
            submit=self._submit_by,
            submit_chunk=lambda deadline, chunk: self._submit_by(
                deadline, runner, (fn, chunk, *catch)
            ),
            timeout=timeout,
            chunksize=chunksize,
            workers=max(1, self.worker_count),
            window=self._map_window(),
            progress=progress,
            name=self.name,
            ordered=ordered,
            open_maps=self._open_maps,
            return_exceptions=return_exceptions,
        )

    def _submit_by(
        self, deadline: float | None, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> Future[T]:
        """`submit` for `map`: waits for room only until ``deadline`` (then ``TimeoutError``)."""
        future = self._submit(self._task_timeout, fn, args, {}, deadline=deadline)
        assert future is not None
        return future

    def dispose(self, wait: bool = True) -> None:
        if self._inherited():
            return  # (the parent's: never shut down, never waited for, from a forked child)
        # _dispose_lock makes a second caller wait until the first has joined
        # the workers, so that "dispose returned" always means "they are gone".
        with self._dispose_lock:
            self._dispose(wait)

    def _dispose(self, wait: bool) -> None:
        if wait and _threads.on_service_thread():
            # (From an idle callback, say, on the I/O loop: waiting for the
            # loop would wait forever.) The work still finishes and the
            # workers still stop, as with wait=False.
            wait = False
        with self._lock:
            self._close_admission()  # blocked submitters raise PoolShutDownError
            if wait:
                while self._outstanding:
                    self._drained.wait()
            if not self._outstanding:
                self._retire_all()
            if not wait:
                return
            self._disposal_waits = True  # (this thread lets the fork server go)
            while self._io_token is not None or self._starts:
                self._io_done.wait()
        self._drop_server()
        self._shared = None  # (no worker is left to send it to)
        _live_pools.discard(self)
        if self._busy_slots is not None:
            self._return_places()
            grant_places(self._busy_slots.leave(self))
        if self._budget is not None:
            self._budget.unregister(self)  # its places return to the budget

    # -- QueuedPool's hooks ----------------------------------------------

    def _running(self) -> int:
        return sum(1 for w in self._workers.values() if w.assigned)

    def _use_grant(self) -> None:
        self._dispatch()

    def _after_grant(self) -> None:
        self._after_unlock()

    def _stop_dispatch(self, terminate: bool) -> None:
        if terminate:
            self._terminating = True  # (running tasks end with their workers)

    def _unqueue(self, future: _TaskFuture) -> None:
        self._outstanding.pop(future.task_id, None)

    def _finish_cancelled(self, future: _TaskFuture) -> None:
        self._finish_tasks([(future, None, None)])
