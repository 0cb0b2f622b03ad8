"""Each key's pool as loky workers (optional: ``pip install 'pool-manager[loky]'``).

``LokyPoolFactory()`` is a manager factory: the pool it builds for a key, a
`LokyWorkerPool`, runs that key's tasks in loky worker processes (fresh
interpreters, started by fork+exec or spawn) instead of workers forked from
the fork server. The fork server stays the default on Linux; loky is the
engine for where it cannot go (it needs ``os.fork`` and descriptor
passing), and for users who want loky's workers::

    with WorkerPoolManager(4, 600, 4 * 3600) as manager:
        with manager.lease("tenant-a", factory=LokyPoolFactory()) as pool:
            results = list(pool.map(crunch, range(100)))

Each worker is a *slot*: a one-worker ``loky.ProcessPoolExecutor`` of its
own. How a task travels::

    submit ──▶ local queue ──▶ dispatch ──▶ slot (its executor's ──▶ its one
      │        (cancellable;   (at most 2    submit: call queue)     loky worker
      │         backpressure)   per slot)                                │
      ▼                                                                  │
    future ◀── _answered, on the slot's loky manager thread ◀── result ◀─┘

- The cap: at most `LokyWorkerPool.worker_count` slots (never above
  ``max_size``), started as queued tasks find no idle slot, so at most that
  many tasks run at once. A slot is handed at most 2 tasks at a time: one
  running, and, for short kinds of task, one waiting in loky's call queue
  (so the worker never waits for the parent between them). The rest wait
  in the pool's local queue, where ``cancel()`` works and ``max_pending``
  applies (`QueuedPool`, ``_queued.py``). A grant below the slots in use shuts down the idle
  slots beyond it at once, the busy ones when they finish.
- Crash isolation: a worker that dies (``os._exit``, a signal, the OOM
  killer) breaks its slot's executor. Its one worker runs its tasks in the
  order sent, so the slot's first unanswered task is the one that was
  running: it alone fails, with `WorkerLostError` caused by loky's
  ``TerminatedWorkerError``; the other task handed to the slot had not
  started and goes back to the front of the queue. The broken executor is
  shut down and never used again; a new slot starts as needed. A task
  whose arguments cannot be pickled fails alone (loky's ``PicklingError``).
  Two limits: a task handed to a slot in the moment between its idle
  worker's death and loky noticing it fails with `WorkerLostError` though
  it never ran; and when loky ends a live worker (a result that would not
  load), the other task it held fails too, as it may have started: a task
  runs at most once, never twice.
- A slot starts by running a probe: its worker's pid and whether the
  pool's initializer raised there. A slot takes tasks only once its probe
  has answered; 3 slots in a row that fail to get ready (the initializer
  raised, or the worker died) fail the queued tasks, as `BaseWorkerPool`'s
  workers do.
- No orphans: each worker runs a watchdog thread (started by the slot's
  initializer, before the pool's) that ends the worker within
  ``PARENT_CHECK_INTERVAL`` once its parent, this process, is gone.
- Slots start and stop (``shutdown(wait=True)``) on the callback threads
  (`_threads.CallbackRunner`), never under the pool's lock nor on loky's
  threads; ``dispose`` waits for them.

- Limits, enforced from outside the worker by the watch's thread
  (``_loky_watch.py``: platform-neutral, it waits on a condition and the
  clock): a task past its deadline (``task_timeout``,
  ``submit_with_timeout``) or a worker past ``kill_worker_memory`` has its
  slot's worker ended, and only that task fails. Such tasks run alone in
  their slot, so nothing else was waiting behind them. ``kill_task`` ends
  the slot's worker too; a task behind it in the slot fails with
  `WorkerLostError`, as it may have started. ``max_tasks_per_worker`` and
  ``max_worker_memory`` retire a slot between tasks: no task fails.
  ``idle_timeout`` (a manager's ``worker_idle_timeout``) shuts a slot down
  once it has been idle that long (the watch's thread), never a busy one.

- A second task waits in a slot behind the running one only when both are
  of kinds known to be short (`_dispatch.RunTimes`, as `BaseWorkerPool`
  prefetches): a long or new kind runs alone, so the tasks behind it stay
  queued, cancellable, for whichever slot frees first.
- A manager's caps across keys hold: a slot is a worker to its
  ``max_total_workers`` and ``max_busy_workers`` (``_loky_dispatch.py``).
  A worker handed from one key to another is a slot shut down and another
  started, about 0.1 s of CPU with loky, against a fork for the fork server.

- ``shared_data`` (``_loky_shared.py``): pickled once as the pool is built,
  its large buffers in one named shared-memory segment (not memfd
  descriptors, which loky's workers cannot get), which each worker maps
  read-only and loads from before the pool's initializer.

Only loky's public API is used: an executor per slot, its ``submit`` and
``shutdown``, and its errors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import _RemoteTraceback
from typing import Any, TypeVar

try:
    import loky
    from loky.process_executor import TerminatedWorkerError
    from loky.process_executor import _RemoteTraceback as _LokyRemoteTraceback
except ImportError as error:
    raise ImportError(
        "pool_manager.loky needs loky, which is not installed: pip install 'pool-manager[loky]'"
    ) from error

from . import _loky_watch, _process, _threads
from ._compat import ProcessView, resolve_start_method
from ._dispatch import RunTimes, task_kind
from ._durations import Duration, memory_limits, to_count, to_seconds
from ._loky_dispatch import _LokyDispatch
from ._loky_exit import _live_pools, _register_exit_hook, interpreter_exiting
from ._loky_limits import _LokyLimits
from ._loky_shared import LokySharedData
from ._loky_slots import (
    Probed,
    _Actions,
    _check_options,
    _finish_slot,
    _LokyTaskFuture,
    _lost,
    _main_refs,
    _not_ready,
    _on_a_slot_thread,
    _poisoned,
    _probe,
    _settling_here,
    _setup_failure,
    _Slot,
    _SlotState,
    _start_args,
    _start_slot,
    _task_call,
    slot_context,
    slot_env,
)
from ._native_threads import NativeThreads, ThreadLimit
from ._queued import ChunkedTaskPool
from .errors import (
    PoolTerminatedError,
    WorkerStartError,
)
from .memory import resident_memory

__all__ = ["LokyPoolFactory", "LokyWorkerPool"]

T = TypeVar("T")

logger = logging.getLogger("pool_manager")

#: ``map`` over an input without a length, with no chunk size: chunks are
#: sized to about this many seconds of calls (a loky task costs about a
#: millisecond of pickling and pipes).
TARGET_CHUNK_SECONDS = 0.05

#: Slots in a row that fail to get ready before the queued tasks fail.
MAX_ATTEMPTS = 3

#: Seconds between two checks of the busy workers against ``kill_worker_memory``.
_UNSET: Any = object()


class LokyWorkerPool(_LokyLimits, _LokyDispatch, ChunkedTaskPool[_LokyTaskFuture]):
    """A process pool for one key whose workers are loky's: an ``Executor``.

    Usually built by `LokyPoolFactory` for a `WorkerPoolManager`. Each worker
    is a one-worker ``loky.ProcessPoolExecutor`` (a slot: see the module
    docstring); at most `worker_count` of them run at once. Tasks travel as
    loky pickles them (cloudpickle: lambdas and closures work), but for code
    cloudpickle sends by value (the main script's, a lambda's), which goes by
    this package's pickler: it keeps its file name for tracebacks, and the
    main script's functions and classes go by reference where the workers
    import the script (``context="loky_init_main"`` or ``"spawn"``). A worker
    that dies fails only the task it was running (`WorkerLostError`).

    Done-callbacks run on the thread that settles the future, usually the
    slot's loky manager thread (as ``ProcessPoolExecutor``'s run on its
    manager thread): keep them short, and do not wait in one for another
    task of the pool. A ``submit`` there is never held by backpressure.

    Args:
        max_size: the most worker processes (slots) at once
            (``ProcessPoolExecutor``'s ``max_workers``, accepted as another
            name for it). Default: the CPUs this process may use.
        mp_context: accepted for ``ProcessPoolExecutor`` compatibility (a start
            method name or ``multiprocessing`` context, checked); the workers
            start as ``context`` says.
        max_pending: backpressure. ``None`` (the default) never blocks; an int
            ``n`` blocks ``submit`` while `worker_count` tasks run and ``n``
            more wait.
        initializer, initargs: run ``initializer(*initargs)`` once in each
            worker process. If it raises, the worker takes no task; 3
            workers in a row that fail so fail the queued tasks. A task or
            the initializer reads the worker's index in the pool with
            `pool_manager.worker_index`.
        finalizer, finalargs: run ``finalizer(*finalargs)`` in a worker as
            its slot is shut down cleanly (idle, recycled, retired by the
            caps across keys, or at shutdown); not in a worker that is ended
            or dies. What it raises is written to the worker's stderr.
        context: loky's start method: ``"loky"`` (fork+exec on POSIX, the
            default), ``"loky_init_main"`` or ``"spawn"``. ``"fork"`` and
            ``"forkserver"`` are refused.
        env: environment variables (str to str) set in each worker before
            it imports anything (``"loky"`` and ``"loky_init_main"`` only).
        task_timeout: seconds a task may run; past that its slot's worker is
            ended (the watch: `_loky_watch`) and its future fails with
            `TaskTimeoutError`. Per call: `submit_with_timeout`; in `map`,
            each call's (a pool with a deadline maps one call per task).
            A task with a deadline runs alone in its slot (no second task
            waits behind it), so ending its worker ends nothing else.
        max_tasks_per_worker: a slot is shut down (cleanly, between tasks)
            after this many tasks, and a new one started as needed
            (``max_tasks_per_child`` is accepted as another name for it).
        max_worker_memory: bytes, or a string like ``"512MB"``: a slot whose
            worker's resident memory is above this after a task takes no
            more and is shut down once it holds none; no task fails.
        kill_worker_memory: a hard limit above ``max_worker_memory``: a worker
            above it (checked every 50 ms) is ended at once and only its
            task fails, with `WorkerMemoryError`. Each slot then holds one
            task at a time.
        idle_timeout: seconds a slot's worker may stay idle; then the slot is
            shut down, and started again on demand. ``None`` (the default,
            as ``ProcessPoolExecutor``) keeps it.
        shared_data: one large read-only object for every worker, as
            `BaseWorkerPool`'s: pickled once, here; its large buffers (numpy
            arrays' data, ``pickle.PickleBuffer``, a large ``bytes``) go into
            one named shared-memory segment (``multiprocessing.shared_memory``,
            not the fork server's memfd) that each worker maps read-only; it
            loads the object once, before the initializer, and tasks read it
            with `pool_manager.shared_data`. The pool unlinks the segment once
            disposed (its workers gone) or collected; if this process is
            killed, multiprocessing's resource tracker unlinks it (see
            ``_loky_shared.py``). If it fails to load in 3 workers in a row,
            the queued tasks fail with `WorkerPoolBrokenError`.
        native_threads: each worker's BLAS and OpenMP threads, as
            `BaseWorkerPool`'s: ``"auto"`` (``max(1, CPUs // max_size)``), an
            int, or ``None``. The variables are set as the worker's
            interpreter starts (with ``"spawn"``, as its initializer starts:
            libraries its main module loaded are limited with threadpoolctl).

    Raises:
        TypeError, ValueError: arguments of the wrong type or range, or that
            cannot be pickled (``initializer``, ``initargs``, ``shared_data``).
        OSError: ``shared_data``'s buffers could not be put in shared memory.
    """

    _idle_callback_failed = "an idle callback of a loky pool failed"
    _target_chunk_seconds = TARGET_CHUNK_SECONDS

    def __init__(
        self,
        max_size: int | None = None,
        *,
        max_workers: int | None = None,
        mp_context: object = None,
        max_tasks_per_child: int | None = None,
        max_pending: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[Any, ...] = (),
        context: str = "loky",
        env: dict[str, str] | None = None,
        task_timeout: Duration | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        kill_worker_memory: int | str | None = None,
        idle_timeout: Duration | None = None,
        shared_data: object = None,
        native_threads: NativeThreads = "auto",
    ) -> None:
        if max_size is not None and max_workers is not None:
            raise TypeError("give max_size or its alias max_workers, not both")
        size = max_size if max_size is not None else max_workers
        if max_tasks_per_worker is not None and max_tasks_per_child is not None:
            raise TypeError("give max_tasks_per_worker or its alias max_tasks_per_child, not both")
        if max_tasks_per_worker is None:
            max_tasks_per_worker = max_tasks_per_child
        resolve_start_method(mp_context)
        _check_options(max_pending, initializer, initargs, context, env, finalizer, finalargs)
        self._task_timeout = to_seconds("task_timeout", task_timeout, allow_none=True)
        self._idle_timeout = to_seconds("idle_timeout", idle_timeout, allow_none=True)
        self._max_tasks = (
            None
            if max_tasks_per_worker is None
            else to_count("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        )
        self._soft_memory, self._hard_memory = memory_limits(max_worker_memory, kill_worker_memory)
        self._next_memory_check = 0.0  # time.monotonic(), for kill_worker_memory
        # The local queue (_pending), its lock and conditions, the counts and
        # the grant (_drained: dispose's waiters); _lock guards them and everything below.
        if size is None:
            size = _process.cpu_count()
        elif isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"max_workers must be an int, not {type(size).__name__}")
        elif size <= 0:
            raise ValueError("max_workers must be greater than 0")  # (ProcessPoolExecutor's words)
        super().__init__(size, max_pending)
        self._context_name = context
        self._context = slot_context(context)
        self._initializer = initializer
        self._initargs = initargs
        self._finalizer = finalizer
        self._finalargs = finalargs
        self._env = None if env is None else dict(env)
        self._threads = ThreadLimit.of(native_threads, size, _process.cpu_count())

        self._outstanding: set[_LokyTaskFuture] = set()  # accepted, not finished
        self._slots: list[_Slot] = []  # not closed: starting, ready or retiring
        self._waiting = 0  # queued tasks not cancelled (in _pending)
        self._unsettled = 0  # accepted, future not yet settled
        self._starts = 0  # slot starts under way (callback threads)
        self._closes = 0  # slot shutdowns under way
        self._fruitless = 0  # slots in a row that failed to get ready
        self._stop_sending = False  # terminate
        #: The interpreter is exiting (`_at_exit`): loky can start no executor
        #: now (it registers an exit hook as each one starts, which the
        #: interpreter refuses), so the queued tasks go to the ready slots.
        self._exiting = False
        self._estimates = RunTimes()  # each kind of task's run time (`_dispatch`)
        self._init_caps()
        # (Last: its segment is made once every other argument is checked.)
        self._shared = LokySharedData.of(shared_data)
        self._shared_spec = None if self._shared is None else self._shared.spec

    # -- WorkerPool ------------------------------------------------------

    @property
    def context(self) -> str:
        """loky's start method for the workers."""
        return self._context_name

    def worker_pids(self) -> list[int]:
        """Pids of the pool's loky workers that are started and not shut down."""
        with self._lock:
            return [slot.pid for slot in self._slots if slot.pid is not None]

    @property
    def _max_workers(self) -> int:
        """``ProcessPoolExecutor._max_workers``: the pool's `max_size`."""
        return self.max_size

    @property
    def _processes(self) -> dict[int, ProcessView]:
        """The workers that take tasks, by pid (as ``ProcessPoolExecutor._processes``)."""
        with self._lock:
            return {
                slot.pid: ProcessView(_SlotState(slot.pid, slot))
                for slot in self._slots
                if slot.pid is not None
            }

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a loky worker; returns a ``Future``.

        Never waits for a worker to start (slots start on the callback
        threads). Blocks while the pool is full (only with ``max_pending``),
        but never on a thread that must not stall (a done-callback's, an
        event loop's): there the task is admitted beyond ``max_pending``. A
        task whose arguments or result cannot be pickled fails its own
        future.

        Raises:
            TypeError: ``fn`` is not callable.
            PoolShutDownError: (a ``RuntimeError``) the pool is shut down.
        """
        return self._submit(None, fn, args, kwargs)

    def _submit(
        self,
        deadline: float | None,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None | object = _UNSET,
    ) -> Future[T]:
        """`submit`, waiting for room only until ``deadline`` (``time.monotonic()``);
        ``timeout``: the task's own (default: the pool's ``task_timeout``)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        actions = _Actions()
        with self._lock:
            self._admit(deadline)
            future = _LokyTaskFuture(self, (fn, args, kwargs))
            future.kind = task_kind(fn, args)
            future.timeout = self._task_timeout if timeout is _UNSET else timeout  # type: ignore[assignment]
            self._outstanding.add(future)
            self._unsettled += 1
            self._enqueue(future)
            self._waiting += 1
            self.last_submit = time.monotonic()
            # Under a budget, a pool that could use another slot asks for it
            # first: else its slots would take the queued tasks and it would
            # never grow (past that, the budget hears of it as tasks finish).
            ask = self._asks_budget()
            if not ask:
                self._plan(actions)
        if ask:
            assert self._budget is not None
            self._budget.submitted(self, True)
            with self._lock:
                self._plan(actions)
        self._act(actions)
        return future

    def dispose(self, wait: bool = True) -> None:
        """Stop accepting work, let accepted work finish, then shut every slot down.

        With ``wait``, blocks until every accepted task's future is settled and
        every slot's executor is shut down (its worker gone, its threads
        joined). Called from a done-callback on a loky manager thread it does
        not wait (that thread would wait for itself); the slots still shut
        down once the work is done. Idempotent; blocked ``submit`` calls
        raise `PoolShutDownError`.
        """
        if wait and _on_a_slot_thread():
            wait = False
        actions = _Actions()
        with self._lock:
            self._close_admission()
            if not self._outstanding:
                self._close_all(actions, kill=False)
        self._act(actions)
        if not wait:
            return
        with self._dispose_lock:
            with self._lock:
                # (Signalled by `_act` as the last future settles, and `_start`
                # as the last slot start ends; each counts down in a finally.)
                while self._unsettled or self._starts:
                    self._drained.wait()
                actions = _Actions()
                self._close_all(actions, kill=False)
            self._act(actions, here=True)
            with self._lock:
                while self._closes:  # (signalled by `_shut`, in its finally)
                    self._drained.wait()
            _live_pools.discard(self)  # (nothing left for the exit hook)
            self._shared = None  # (no worker is left to load it: its segment goes)
            self._leave_caps()

    def terminate(self) -> None:
        """Stop now: cancel queued tasks, end the running ones, return when the workers are gone.

        Running tasks (those handed to a slot) fail with `PoolTerminatedError`
        and their workers are killed. Idempotent; `submit` afterwards raises.
        """
        self._cancel_queued(terminate=True)  # (and no more sending: _stop_dispatch)
        actions = _Actions()
        with self._lock:
            running = [future for slot in self._slots for future in slot.handed]
            running += [future for future in self._pending if not future._dropped]
            self._pending.clear()
            self._waiting = 0
            for slot in self._slots:
                slot.handed.clear()
                slot.unsent.clear()
            self._close_all(actions, kill=True)  # (first: their workers may be running tasks)
            error = PoolTerminatedError("the pool was terminated while this task was running")
            self._conclude([(future, False, error) for future in running], actions)
        self._act(actions, here=not _on_a_slot_thread())
        self.dispose(wait=True)

    # -- QueuedPool's hooks ------------------------------------------------

    def _calls_alone(self) -> bool:
        return self._task_timeout is not None  # (each call gets its own deadline)

    def _running(self) -> int:
        return sum(1 for slot in self._slots if slot.handed)

    def _after_grant(self) -> None:
        actions = _Actions()
        with self._lock:
            self._plan(actions)
        self._act(actions)

    def _stop_dispatch(self, terminate: bool) -> None:
        if terminate:
            self._stop_sending = True

    def _unqueue(self, future: _LokyTaskFuture) -> None:
        self._waiting -= 1

    def _finish_cancelled(self, future: _LokyTaskFuture) -> None:
        actions = _Actions()
        with self._lock:
            self._conclude([(future, None, None)], actions)
        self._act(actions)

    # -- decisions (under _lock; the dispatch is `_LokyDispatch`'s) ------------------

    def _close_slot(self, slot: _Slot, actions: _Actions, kill: bool) -> None:
        """(Holds _lock) Take ``slot`` out of the pool; its executor is shut down off the lock
        (or, if it is still starting, by its start as it finishes)."""
        if slot.closed:
            return
        slot.closed = slot.retiring = True
        self._slots.remove(slot)
        self._release_place(slot)
        if slot.idle_since is not None:
            actions.watch = True  # (the watch may have nothing left to wait for)
        if not slot.ready and slot.handed:  # (never sent: they go back to the queue)
            self._requeue(list(slot.handed))
            slot.handed.clear()
            slot.unsent.clear()
        if slot.executor is not None:
            self._closes += 1
            actions.closes.append((slot, kill))

    def _close_all(self, actions: _Actions, kill: bool) -> None:
        for slot in list(self._slots):
            self._close_slot(slot, actions, kill=kill or not slot.ready)

    def _conclude(
        self, outcomes: list[tuple[_LokyTaskFuture, bool | None, Any]], actions: _Actions
    ) -> None:
        """(Holds _lock) Count finished tasks (``ok`` None: cancelled); their futures settle
        once the lock is released. A task already finished is left alone. A pool
        shut down with no work left closes its slots."""
        done = [outcome for outcome in outcomes if outcome[0] in self._outstanding]
        for future, _, _ in done:
            self._outstanding.discard(future)
            if future._deadline is not None:
                actions.watch = True  # (the watch may now have nothing left to wait for)
        if done:
            actions.idle_callbacks += self._count_finished(ok for _, ok, _ in done)
            actions.finished += done
            actions.went_idle = not self._outstanding
        if self._shut_down and not self._outstanding:
            self._close_all(actions, kill=False)

    def _fail_queued(self, error: BaseException, actions: _Actions) -> None:
        """(Holds _lock) Fail every queued task with ``error`` (no slot could get ready)."""
        queued = [future for future in self._pending if not future._dropped]
        self._pending.clear()
        self._waiting = 0
        self._conclude([(future, False, error) for future in queued], actions)

    def _start_failed(self, error: BaseException, actions: _Actions) -> None:
        """(Holds _lock) A slot failed to get ready: after `MAX_ATTEMPTS` in a row, the
        queued tasks fail with ``error``; before, `_plan` starts another."""
        self._fruitless += 1
        if self._fruitless >= MAX_ATTEMPTS and not self._exiting:
            self._fail_queued(error, actions)

    # -- what runs off the lock ----------------------------------------------

    def _act(self, actions: _Actions, here: bool = False) -> None:
        """Do what a decision left (no lock held): start and shut slots down on the
        callback threads (``here``: shut them down on this thread), send handed
        tasks, run idle callbacks, then settle the finished futures."""
        runner = _threads.get_runner()
        try:
            if actions.watch:
                _loky_watch.watch(self)
            for slot in actions.starts:
                runner.run(_threads.Strand(), functools.partial(self._start, slot))
            for slot, kill in actions.closes:
                if here:
                    self._shut(slot, kill)
                else:
                    runner.run(_threads.Strand(), functools.partial(self._shut, slot, kill))
            for slot in actions.feeds:
                self._feed(slot)
            self._tell_budget(actions)
            self._run_idle_callbacks(actions.idle_callbacks)
        finally:
            try:
                for future, ok, value in actions.finished:
                    future._call = None
                    try:
                        self._settle(future, ok, value)
                    except Exception:
                        logger.exception("settling %r failed", future)
            finally:
                if actions.finished:
                    with self._lock:
                        self._unsettled -= len(actions.finished)
                        if not self._unsettled:
                            self._drained.notify_all()

    def _start(self, slot: _Slot) -> None:
        """(A callback thread) Make ``slot``'s executor; its probe starts its worker."""
        executor = None
        try:
            try:
                if interpreter_exiting():  # (no process is started, to fail as it loads)
                    raise RuntimeError("the interpreter is exiting: no loky worker can start")
                env, threads = slot_env(self._env, self._threads, self._context_name)
                executor = loky.ProcessPoolExecutor(
                    1,
                    context=self._context,
                    initializer=_start_slot,
                    initargs=_start_args(
                        self._initializer,
                        self._initargs,
                        self._shared_spec,
                        slot.index,
                        self._finalizer,
                        self._finalargs,
                        threads,
                    ),
                    env=env,
                )
                probe = executor.submit(_probe)
                _register_exit_hook()
            except Exception as error:
                if executor is not None:
                    try:  # (at exit this may fail too: the slot goes whatever happens)
                        executor.shutdown(wait=True, kill_workers=True)
                    except Exception:
                        logger.debug("shutting down a loky executor that failed to start failed")
                actions = _Actions()
                with self._lock:
                    if interpreter_exiting():
                        # (Python 3.12+ refuses loky's threads once the interpreter
                        # begins to exit, maybe before our exit hook has run.)
                        self._exiting = True
                    if not slot.closed:
                        self._close_slot(slot, actions, kill=True)
                        self._start_failed(WorkerStartError.for_cause(error, 0), actions)
                        self._plan(actions)
                self._act(actions)
                self._slot_gone()
                return
            with self._lock:
                slot.executor = executor
                closed = slot.closed
            if closed:  # (terminated, disposed or shrunk while it started)
                executor.shutdown(wait=True, kill_workers=True)
                self._slot_gone()
                return
        finally:
            with self._lock:
                self._starts -= 1
                if not self._starts:
                    self._drained.notify_all()
        probe.add_done_callback(functools.partial(self._ready, slot))

    def _ready(self, slot: _Slot, probe: Future[Probed]) -> None:
        """The probe answered (loky's manager thread): the slot takes tasks, or is dropped."""
        error = CancelledError() if probe.cancelled() else probe.exception()
        pid, failure, main = probe.result() if error is None else (None, None, None)
        actions = _Actions()
        with _settling_here():
            with self._lock:
                if slot.closed:
                    return
                if error is not None or failure is not None:
                    self._close_slot(slot, actions, kill=True)
                    self._start_failed(_not_ready(self._fruitless + 1, error, failure), actions)
                    if failure is not None:
                        self._worker_setup_failed(*_setup_failure(failure))
                else:
                    self._worker_got_ready()
                    self._fruitless = 0
                    slot.pid, slot.ready, slot.main = pid, True, _main_refs(main)
                    if slot.retiring and not slot.handed:
                        self._close_slot(slot, actions, kill=False)
                    elif slot.handed:  # (handed as it started: they go now)
                        self._sending(slot, list(slot.handed), actions)
                self._plan(actions)
            self._act(actions)
        self._log_setup_failure()

    def _feed(self, slot: _Slot) -> None:
        """Submit ``slot``'s handed tasks to its executor, in the order handed."""
        submitted = []
        with slot.sending:
            while True:
                with self._lock:
                    if not slot.unsent:
                        break
                    future = slot.unsent.popleft()
                    call = future._call
                if call is None:  # (settled meanwhile: terminate)
                    continue
                try:
                    inner = slot.executor.submit(*_task_call(call, slot.main))
                except Exception as error:
                    self._refused(slot, future, error)
                else:
                    submitted.append((future, inner))
        for future, inner in submitted:
            # Runs at once if already answered; else on the slot's loky manager thread.
            inner.add_done_callback(functools.partial(self._answered, slot, future))

    def _refused(self, slot: _Slot, future: _LokyTaskFuture, error: BaseException) -> None:
        """The slot's executor refused ``future``: broken (its worker died idle), the task
        goes back to the queue and the slot takes no more; else the task fails."""
        actions = _Actions()
        with self._lock:
            if future not in slot.handed:
                return
            if isinstance(error, loky.BrokenProcessPool):
                index = slot.handed.index(future)
                never_sent = list(slot.handed)[index:]
                for _ in never_sent:
                    slot.handed.pop()
                slot.unsent.clear()
                self._requeue(never_sent)
                slot.retiring = True
                if not slot.handed:
                    self._close_slot(slot, actions, kill=True)
            else:  # (the interpreter is exiting)
                slot.handed.remove(future)
                self._conclude([(future, False, error)], actions)
            self._plan(actions)
        self._act(actions)

    def _answered(self, slot: _Slot, future: _LokyTaskFuture, inner: Future[Any]) -> None:
        """loky answered for ``future`` (on the slot's manager thread): settle it, or,
        if the slot broke, fail its running task and requeue the other."""
        with _settling_here():
            error = CancelledError() if inner.cancelled() else inner.exception()
            pid, seconds, value = inner.result() if error is None else (slot.pid, 0.0, None)
            if error is not None and isinstance(error.__cause__, _LokyRemoteTraceback):
                # (The worker's traceback, as ProcessPoolExecutor's class holds it.)
                error.__cause__ = _RemoteTraceback(error.__cause__.tb)
            # (Measured off the lock: the soft limit is checked between tasks.)
            grown = (
                self._soft_memory is not None
                and pid is not None
                and (resident_memory(pid) or 0) > self._soft_memory
            )
            actions = _Actions()
            with self._lock:
                if future not in slot.handed:
                    return  # (terminated, ended, or sent again after its slot broke)
                future.run_time = time.monotonic() - future._sent_at
                if isinstance(error, loky.BrokenProcessPool):
                    self._broke(slot, error, actions)
                else:
                    slot.handed.remove(future)
                    slot.pid = pid
                    if error is None:
                        self._estimates.observe(future.kind, seconds)
                    outcome = (future, error is None, value if error is None else error)
                    self._conclude([outcome], actions)
                    if grown:
                        slot.retiring = True  # (max_worker_memory: no task is lost)
                    if slot.retiring and not slot.handed:
                        self._close_slot(slot, actions, kill=False)
                self._plan(actions)
            self._act(actions)

    def _broke(self, slot: _Slot, error: BaseException, actions: _Actions) -> None:
        """(Holds _lock) ``slot``'s executor broke: its first unanswered task was running.

        Its worker died (``TerminatedWorkerError``): that task fails with
        `WorkerLostError`, and the other one, which had not started, goes
        back to the queue. Else a task or a result would not load (loky's
        ``BrokenProcessPool`` says which): that task fails with it, and the
        other one with `WorkerLostError`, since it may have started before
        loky ended the worker.
        """
        culprit = slot.handed.popleft()
        rest = list(slot.handed)
        slot.handed.clear()
        slot.unsent.clear()
        outcomes: list[tuple[_LokyTaskFuture, bool | None, Any]]
        if isinstance(error, TerminatedWorkerError):
            outcomes = [(culprit, False, _lost(error, slot.pid))]
            self._requeue(rest)
        else:
            outcomes = [(culprit, False, _poisoned(error))]
            outcomes += [(future, False, _lost(error, slot.pid)) for future in rest]
        self._conclude(outcomes, actions)
        self._close_slot(slot, actions, kill=True)

    def _shut(self, slot: _Slot, kill: bool) -> None:
        """Shut ``slot``'s executor down and wait for its worker and threads (no lock held)."""
        try:
            if not kill and slot.ready and self._finalizer is not None:
                # (Shutdown waits for it; a broken executor refuses it, and its
                # worker is gone anyway.)
                with contextlib.suppress(Exception):
                    slot.executor.submit(_finish_slot)
            slot.executor.shutdown(wait=True, kill_workers=kill)
            # A worker loky killed (a broken executor, kill_workers) is not
            # joined: multiprocessing keeps it, and the descriptor of its
            # exit, until asked for the live children.
            multiprocessing.active_children()
        except Exception:
            logger.exception("shutting down a loky executor failed")
        finally:
            with self._lock:
                self._closes -= 1
                self._live -= 1
                if not self._closes:
                    self._drained.notify_all()
            self._tell_budget(_Actions(), slots_gone=1)


from ._loky_factory import LokyPoolFactory, builds  # noqa: E402

builds(LokyWorkerPool)
