"""A pool of worker processes for one key: the ``WorkerPool`` interface and
``BaseWorkerPool``, its implementation on one loky executor.

A pool knows nothing of keys, leases or expiry (that is the manager's job).
It owns: the worker processes (through ``_loky.LokyExecutor``), how many of
them it may use (``grant_workers``), backpressure, and the futures it hands
out. Every future it returns is a ``_TaskFuture`` chained to loky's own, so
the pool's count of unfinished work drops *before* a waiter on the future
wakes: a caller that has its result and releases its lease sees an idle pool.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures.process import _RemoteTraceback
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from . import _loky
from ._durations import Duration, to_bytes, to_count, to_seconds
from ._worker import (
    DEADLINE,
    EXIT_REASONS,
    MEMORY,
    WorkerLimits,
    change_retire_counter,
    dump_call,
    make_retire_counter,
    read_slot,
    run_chunk,
    run_task,
    start_worker,
)
from .errors import (
    ArgumentUnpicklingError,
    PoolShutDownError,
    PoolTerminatedError,
    ResultUnpicklingError,
    TaskKilledError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
    WorkerPoolBrokenError,
    describe_exit,
)

if TYPE_CHECKING:
    from .budget import WorkerBudget

__all__ = ["DEFAULT_IDLE_TIMEOUT", "BaseWorkerPool", "TaskCounts", "WorkerPool"]

T = TypeVar("T")

logger = logging.getLogger("pool_manager")

#: Seconds an idle worker process waits for work before it exits; the next
#: submit starts it again. ``None`` keeps workers until the pool is disposed.
DEFAULT_IDLE_TIMEOUT: float = 300.0


class WorkerPool(Executor, abc.ABC):
    """What a `WorkerPoolManager` needs of a pool, on top of ``Executor``.

    Factories return instances of this class; in practice a subclass of
    `BaseWorkerPool`. Everything here is safe to call from any thread.
    """

    @property
    @abc.abstractmethod
    def max_size(self) -> int:
        """The most worker processes this pool may ever use."""

    @property
    @abc.abstractmethod
    def worker_count(self) -> int:
        """Workers granted so far (never above `max_size`)."""

    @abc.abstractmethod
    def grant_workers(self, count: int) -> int:
        """Grant up to ``count`` more workers, capped at `max_size`.

        Returns the number granted in all. A pool starts with all `max_size`
        workers usable; its first ``grant_workers`` call (the manager makes it
        for every pool it builds) switches it to using only what it was
        granted, as the Go ``spawnWorkers`` does. Starts no process.
        """

    @property
    @abc.abstractmethod
    def unfinished_tasks(self) -> int:
        """Tasks accepted by ``submit`` whose futures are not done yet."""

    @abc.abstractmethod
    def worker_pids(self) -> list[int]:
        """Pids of this pool's live worker processes."""

    @abc.abstractmethod
    def add_idle_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` each time `unfinished_tasks` drops to zero.

        It runs on whichever thread finished the last task: keep it short.
        """

    def add_worker_event_callback(self, callback: Callable[[str, int, str], object]) -> None:
        """Call ``callback(kind, pid, reason)`` when a worker is lost (``kind="worker_lost"``).

        The default never calls it.
        """

    def worker_exit_reason(self, pid: int) -> str | None:
        """Why worker ``pid``, now gone, left cleanly (e.g. ``"idle_timeout"``), if known.

        Asked once per worker; the default knows nothing.
        """
        return None

    def release_idle_resources(self) -> bool:
        """Free what an idle pool holds beyond its own object; True if anything was freed.

        The supervisor calls it at each memory sample for pools with no lease
        and no unfinished work. The default frees nothing.
        """
        return False

    def task_counts(self) -> TaskCounts:
        """The pool's tasks: submitted, running, queued, completed, failed, cancelled.

        The default knows only the unfinished tasks (counted as queued);
        `BaseWorkerPool` counts them all.
        """
        return TaskCounts(
            submitted=0,
            running=0,
            queued=self.unfinished_tasks,
            completed=0,
            failed=0,
            cancelled=0,
        )

    def terminate(self) -> None:
        """Stop now: cancel queued tasks and end the running ones; wait for the workers.

        The default cancels what has not started and waits for the rest;
        `BaseWorkerPool` ends running tasks by ending their workers.
        """
        self.shutdown(wait=True, cancel_futures=True)

    @abc.abstractmethod
    def dispose(self, wait: bool = True) -> None:
        """Stop accepting work, let accepted work finish, then stop the workers.

        Idempotent. With ``wait``, blocks until the work is done and the
        worker processes and helper threads are gone. Subclasses that hold
        shared data release it here, after calling ``super().dispose(wait)``.
        """


class _TaskFuture(Future):  # type: ignore[type-arg]
    """The future `BaseWorkerPool.submit` returns, chained to loky's.

    It settles only after the pool has counted the task as finished, and it
    cancels through to loky (only a task that has not started can be
    cancelled, as with any ``concurrent.futures`` executor). When a sibling
    worker's crash tears its task down, the pool sends it again and chains
    this future to the new attempt.
    """

    def __init__(
        self, pool: BaseWorkerPool, task_id: int, payload: bytes, timeout: float | None
    ) -> None:
        super().__init__()
        self._pool = pool
        self.task_id = task_id
        self._timeout = timeout
        self.attempts = 1
        self._payload: bytes | None = payload  # kept until settled, to send again
        self._inner: Future[Any] | None = None
        self._executor: _loky.LokyExecutor | None = None

    def _envelope(self) -> tuple[int, bytes, float | None]:
        """`run_task`'s arguments for this task."""
        assert self._payload is not None
        return (self.task_id, self._payload, self._timeout)

    def _attach(self, inner: Future[Any], executor: _loky.LokyExecutor) -> None:
        self._inner = inner
        self._executor = executor
        inner.add_done_callback(self._settle)

    def _settle(self, inner: Future[Any]) -> None:
        # Runs in loky's manager thread (or in cancel()): count first, then wake.
        if inner is not self._inner:
            return
        if inner.cancelled():
            self._pool._task_finished(self, _CANCELLED)
            self._inner = self._executor = None
            Future.cancel(self)
            self.set_running_or_notify_cancel()
            return
        error = inner.exception()
        if error is None:
            ok, data = inner.result()
            self._finish(*_load_outcome(ok, data))
        elif isinstance(error, _loky.BrokenProcessPool):
            assert self._executor is not None
            lost = self._pool._worker_crashed(self, self._executor)
            if lost is not None:
                self._finish(False, lost)
        else:
            self._finish(False, error)

    def _abandon(self, error: BaseException) -> None:
        self._inner = None  # a later settle of the old attempt is ignored
        self._finish(False, error)

    def _finish(self, ok: bool, value: Any) -> None:
        self._pool._task_finished(self, _COMPLETED if ok else _FAILED)
        # Drop what ties this future to loky's (a reference cycle through the
        # callback) and to the executor, whose pipes would wait for the GC.
        self._payload = None
        self._inner = self._executor = None
        if ok:
            self.set_result(value)
        else:
            self.set_exception(value)

    def cancel(self) -> bool:
        inner = self._inner
        if inner is None:
            # Still inside submit(), on its way to loky: too late to stop.
            return self.cancelled()
        if self.done():
            return super().cancel()
        # A successful cancel of the inner future runs _settle synchronously.
        return inner.cancel() and self.cancelled()

    def running(self) -> bool:
        inner = self._inner
        return super().running() or (inner is not None and inner.running() and not self.done())


def _remote_traceback(text: str) -> BaseException:
    """The worker's traceback, as ``ProcessPoolExecutor`` attaches it (``__cause__``)."""
    return _RemoteTraceback(f'\n"""\n{text}"""')  # type: ignore[arg-type]


def _load_outcome(ok: bool, data: bytes) -> tuple[bool, Any]:
    """Turn `run_task`'s reply into ``(ok, result or exception)``, in the parent."""
    try:
        loaded = pickle.loads(data)
    except BaseException as unpickling_error:
        what = "result" if ok else "exception"
        result_failure = ResultUnpicklingError(
            f"the task ran, but its {what} failed to unpickle in the parent process: "
            f"{type(unpickling_error).__name__}: {unpickling_error}"
        )
        # Its traceback as text: the frames themselves would pin loky's manager
        # thread, and with it the executor's pipes, until a garbage collection.
        text = "".join(traceback.format_exception(unpickling_error))
        result_failure.__cause__ = _remote_traceback(text)
        return False, result_failure
    if ok:
        return True, loaded
    kind, error, text = loaded
    if kind == "arguments":
        argument_failure = ArgumentUnpicklingError(
            "the task's function or arguments failed to unpickle in the worker process: "
            f"{type(error).__name__}: {error}"
        )
        argument_failure.__cause__ = _remote_traceback(text)
        return False, argument_failure
    error.__cause__ = _remote_traceback(text)
    return False, error


_SUBMITTED, _COMPLETED, _FAILED, _CANCELLED = range(4)


class TaskCounts(TypedDict):
    """A pool's tasks, counted since it was built."""

    submitted: int  #: accepted by submit (or map)
    running: int  #: in a worker now
    queued: int  #: accepted, not started
    completed: int  #: finished with a result
    failed: int  #: finished with an exception (the task's own, or a lost worker)
    cancelled: int


#: Pools that have started workers, for the Ctrl-C exit hook (_signals.py).
_live_pools: weakref.WeakSet[BaseWorkerPool] = weakref.WeakSet()

#: How many times a task torn down by other workers' deaths is sent again.
MAX_ATTEMPTS = 3


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _make_slot_dir() -> str:
    """A private directory for the workers' slots, in memory where possible."""
    shm = "/dev/shm"
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    # The parent's pid in the name tells whose it is (tests check for leaks).
    return tempfile.mkdtemp(prefix=f"pool_manager-{os.getpid()}-", dir=where)


def _remove_slot(slot_dir: str, pid: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(slot_dir, str(pid)))


def _result_or_cancel(future: Future[Any], end_time: float | None) -> Any:
    """``future``'s result by ``end_time``; cancels it if that fails."""
    try:
        if end_time is None:
            return future.result()
        return future.result(end_time - time.monotonic())
    finally:
        future.cancel()


class BaseWorkerPool(WorkerPool):
    """A process pool for one key, and a drop-in ``ProcessPoolExecutor``.

    ``BaseWorkerPool(4)`` behaves like ``ProcessPoolExecutor(4)``: four
    worker processes, started on the first submit, fed in order.
    Submissions travel with cloudpickle, so lambdas and closures work.

    Args:
        max_size: the most worker processes (``ProcessPoolExecutor``'s
            ``max_workers``, which is accepted as another name for it).
            Default: the CPUs this process may use.
        initializer, initargs: run ``initializer(*initargs)`` once in each
            worker process, to give it its own state (a model, a connection).
        mp_context: a start method name or ``multiprocessing`` context; its
            start method is used through loky. Default: loky's own.
        max_pending: backpressure. ``None`` (the default) never blocks, like
            ``ProcessPoolExecutor``; an int ``n`` blocks ``submit`` while the
            granted workers are busy and ``n`` more tasks wait.
        idle_timeout: seconds an idle worker waits before it exits (it is
            started again on demand); ``None`` keeps workers alive.
        env: environment variables set in each worker before it imports
            anything.
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
            `submit_with_timeout`.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or range.
    """

    def __init__(
        self,
        max_size: int | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: object = None,
        max_pending: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        env: dict[str, str] | None = None,
        max_tasks_per_worker: int | None = None,
        max_tasks_per_child: int | None = None,
        max_worker_memory: int | str | None = None,
        kill_worker_memory: int | str | None = None,
        task_timeout: Duration | None = None,
    ) -> None:
        if max_size is not None and max_workers is not None:
            raise TypeError("give max_size or its alias max_workers, not both")
        size = max_size if max_size is not None else max_workers
        if size is None:
            size = _loky.cpu_count()
        elif isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"max_workers must be an int, not {type(size).__name__}")
        elif size <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        if max_pending is not None:
            to_count("max_pending", max_pending, minimum=0)
        if max_tasks_per_worker is not None and max_tasks_per_child is not None:
            raise TypeError("give max_tasks_per_worker or its alias max_tasks_per_child, not both")
        max_tasks = (
            max_tasks_per_worker if max_tasks_per_worker is not None else max_tasks_per_child
        )
        if max_tasks is not None:
            to_count("max_tasks_per_worker", max_tasks, minimum=1)
        soft_memory = to_bytes("max_worker_memory", max_worker_memory)
        hard_memory = to_bytes("kill_worker_memory", kill_worker_memory)
        if soft_memory is not None and hard_memory is not None and hard_memory <= soft_memory:
            raise ValueError(
                "kill_worker_memory must be above max_worker_memory (the soft limit "
                "replaces a worker between tasks; the hard one ends it at once)"
            )
        self._limits = WorkerLimits(max_tasks, soft_memory, hard_memory)
        self._task_timeout = to_seconds("task_timeout", task_timeout, allow_none=True)
        self._max_size: int = size
        self._max_pending = max_pending
        self._idle_timeout = to_seconds("idle_timeout", idle_timeout, allow_none=True)
        self._context = _loky.resolve_context(mp_context)
        self._initializer = initializer
        self._initargs = initargs
        self._env = dict(env) if env is not None else None

        # _lock guards everything below; the conditions share it.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)  # backpressure waiters
        self._drained = threading.Condition(self._lock)  # waiters for no outstanding work
        self._outstanding: dict[int, _TaskFuture] = {}  # by task id
        self._task_ids = itertools.count(1)  # 0 means "no task" in a worker's slot
        self._kills: dict[int, int] = {}  # pid -> id of the task kill_task killed it for
        self._slot_dir: str | None = None  # made with the first executor
        self._blind_crashes = 0  # executors in a row that broke with no task running
        self._terminating = False
        self._counts = [0, 0, 0, 0]  # submitted, completed, failed, cancelled
        self._worker_event_callbacks: list[Callable[[str, int, str], object]] = []
        self._worker_events: list[tuple[str, int, str]] = []  # to emit outside _lock
        self._granted: int | None = None  # None: not granted piecemeal, all usable
        self._executor: _loky.LokyExecutor | None = None
        self._old_executors: list[_loky.LokyExecutor] = []  # broken or shut down, to join
        self._shut_down = False
        self._idle_callbacks: list[Callable[[], object]] = []
        self._dispose_lock = threading.Lock()
        self._budget: WorkerBudget | None = None  # see attach_budget

    # -- WorkerPool ------------------------------------------------------

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def max_pending(self) -> int | None:
        """Tasks that may wait beyond the busy workers before ``submit`` blocks."""
        return self._max_pending

    @property
    def worker_count(self) -> int:
        granted = self._granted
        return self._max_size if granted is None else granted

    def grant_workers(self, count: int) -> int:
        to_count("send_size", count, minimum=0)
        with self._lock:
            self._granted = min(self._max_size, (self._granted or 0) + count)
            return self._granted

    @property
    def unfinished_tasks(self) -> int:
        return len(self._outstanding)

    def worker_pids(self) -> list[int]:
        with self._lock:
            executors = [*self._old_executors, *([self._executor] if self._executor else [])]
        return [pid for executor in executors for pid in executor.worker_pids()]

    def add_idle_callback(self, callback: Callable[[], object]) -> None:
        with self._lock:
            self._idle_callbacks.append(callback)

    def add_worker_event_callback(self, callback: Callable[[str, int, str], object]) -> None:
        with self._lock:
            self._worker_event_callbacks.append(callback)

    def worker_exit_reason(self, pid: int) -> str | None:
        slot_dir = self._slot_dir
        if slot_dir is None:
            return None
        _, reason, _ = read_slot(slot_dir, pid)
        _remove_slot(slot_dir, pid)
        return EXIT_REASONS.get(reason)

    def _emit_worker_events(self) -> None:
        with self._lock:
            events, self._worker_events = self._worker_events, []
            callbacks = list(self._worker_event_callbacks)
        for kind, pid, reason in events:
            for callback in callbacks:
                try:
                    callback(kind, pid, reason)
                except Exception:  # a listener's bug must not fail tasks
                    logger.exception("a worker event callback failed")

    def release_idle_resources(self) -> bool:
        """Close the executor once every worker has exited (idle timeout) and no task waits.

        That frees its two threads, its pipes and its named semaphores; the
        next submit builds a new one. An idle pool then costs only its Python
        objects. Returns True if an executor was closed.
        """
        with self._lock:
            executor = self._executor
            if executor is None or self._outstanding or executor.worker_pids():
                return False
            executors = [executor, *self._old_executors]
            self._executor = None
            self._old_executors = []
        for old in executors:
            old.shutdown(wait=True)
        multiprocessing.active_children()  # reap, as in _dispose
        return True

    def task_counts(self) -> TaskCounts:
        # "Running" is read from the workers' slots: exact, ~5 µs a worker.
        slot_dir = self._slot_dir
        running = 0
        if slot_dir is not None:
            running = sum(1 for pid in self.worker_pids() if read_slot(slot_dir, pid)[0])
        with self._lock:
            submitted, completed, failed, cancelled = self._counts
            unfinished = len(self._outstanding)
        running = min(running, unfinished)
        return TaskCounts(
            submitted=submitted,
            running=running,
            queued=unfinished - running,
            completed=completed,
            failed=failed,
            cancelled=cancelled,
        )

    # -- the worker budget (budget.py) ---------------------------------------

    def attach_budget(self, budget: WorkerBudget) -> bool:
        """Run this pool's workers under ``budget`` (a manager's ``max_total_workers``).

        Only before the pool's first submit; returns False (and changes
        nothing) once it has run work, or if it already has a budget.
        """
        with self._lock:
            if self._budget is not None or self._executor is not None or self._shut_down:
                return False
            if self._counts[_SUBMITTED]:
                return False
            self._budget = budget
        budget.register(self)
        return True

    def _budget_info(self) -> tuple[int, int, int, int, int]:
        """(For the budget) workers granted, it could use now, live, idle, asked to leave."""
        want = self.worker_count
        unfinished = len(self._outstanding)
        pids = self.worker_pids()
        slot_dir = self._slot_dir
        idle = len(pids)
        retiring = 0
        if slot_dir is not None and pids:  # (cheap for the many pools with no worker)
            if unfinished:
                idle = sum(1 for pid in pids if not read_slot(slot_dir, pid)[0])
            retiring = change_retire_counter(slot_dir)
        return want, min(want, unfinished), len(pids), idle, retiring

    def _budget_apply(self, actions: list[tuple[str, int]]) -> None:
        """(For the budget) take the new allowance; ask workers to leave. Never under its lock."""
        budget = self._budget
        if budget is None:
            return
        with self._lock:
            executor = self._executor
            if executor is None:
                return  # the next submit builds one with the new allowance
            before = executor.workers
            executor.set_workers(budget.allowed(self))
            grew = executor.workers > before
            slot_dir = self._slot_dir
        for action, count in actions:
            if action == "release":
                for _ in range(count):
                    if not executor.release_idle_worker():
                        break
            elif action == "retire" and count and slot_dir is not None:
                change_retire_counter(slot_dir, count)
            elif action == "reset" and slot_dir is not None:
                value = change_retire_counter(slot_dir)
                if value > count:
                    change_retire_counter(slot_dir, count - value)
        if grew or any(action == "start" for action, _ in actions):
            executor.start_workers()

    @property
    def is_shut_down(self) -> bool:
        """True once `shutdown` or `dispose` was called."""
        return self._shut_down

    # -- Executor --------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker process.

        Returns a ``concurrent.futures.Future``. Blocks while the pool is full
        (only when ``max_pending`` is set). The first submit starts the worker
        processes (tens of milliseconds each).

        Raises:
            TypeError: ``fn`` is not callable.
            PoolShutDownError: (a ``RuntimeError``) the pool is shut down.
        """
        return self._submit(self._task_timeout, fn, args, kwargs)

    def submit_with_timeout(
        self, timeout: Duration | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> Future[T]:
        """`submit` with a deadline: ``timeout`` seconds once the task starts.

        A task still running then has its worker ended; its future fails with
        `TaskTimeoutError` and the pool's other tasks are unaffected.
        ``None`` means no deadline (the pool's ``task_timeout`` is not used).
        """
        seconds = to_seconds("timeout", timeout, allow_none=True)
        return self._submit(seconds, fn, args, kwargs)

    def _submit(
        self,
        timeout: float | None,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Future[T]:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        task_id = next(self._task_ids)
        try:
            payload = dump_call(fn, args, kwargs)
        except Exception as error:
            # As ProcessPoolExecutor: a task that cannot be pickled fails its future.
            if self._shut_down:
                raise PoolShutDownError("cannot schedule new futures after shutdown") from None
            failed: Future[T] = Future()
            failure = error
            if not isinstance(error, pickle.PicklingError):
                failure = pickle.PicklingError(f"could not pickle the task: {error}")
                failure.__cause__ = error
            failed.set_exception(failure)
            return failed
        future = _TaskFuture(self, task_id, payload, timeout)
        with self._lock:
            if self._max_pending is not None:
                while not self._shut_down and len(self._outstanding) >= self._capacity():
                    self._not_full.wait()
            if self._shut_down:
                raise PoolShutDownError("cannot schedule new futures after shutdown")
            executor = self._live_executor()
            self._outstanding[task_id] = future
            self._counts[_SUBMITTED] += 1
        try:
            try:
                inner = executor.submit(run_task, future._envelope())
            except _loky.BrokenProcessPool:
                # A worker died since the last submit: start afresh, once.
                with self._lock:
                    executor = self._live_executor()
                inner = executor.submit(run_task, future._envelope())
        except BaseException as error:
            self._task_finished(future, _SUBMITTED, -1)  # it was never accepted
            if isinstance(error, _loky.ShutdownExecutorError):
                raise PoolShutDownError("cannot schedule new futures after shutdown") from None
            raise
        future._attach(inner, executor)
        budget = self._budget
        if budget is not None:
            wants_more = executor.workers < self.worker_count
            budget.submitted(self, wants_more)
        return future

    def kill_task(self, future: Future[Any]) -> bool:
        """Stop a task now: cancel it if it has not started, else kill its worker.

        Killing the worker fails only that task, with `TaskKilledError`; the
        pool starts a replacement and its other tasks are unaffected (tasks
        torn down with sibling workers run again). Returns False if the task
        had already finished.

        Raises:
            ValueError: ``future`` did not come from this pool's ``submit``.
        """
        if not isinstance(future, _TaskFuture) or future._pool is not self:
            raise ValueError("kill_task takes a future returned by this pool's submit()")
        grace = time.monotonic() + 0.1
        while not future.done():
            if future.cancel():
                return True
            pid = self._worker_running(future.task_id)
            if pid is not None:
                with self._lock:
                    self._kills[pid] = future.task_id
                _loky.kill_worker(pid)
                return True
            if time.monotonic() > grace:
                # Queued in loky's call queue, where it can no longer be
                # cancelled: fail it now and drop whatever it does later.
                future._abandon(
                    TaskKilledError(
                        "the task was killed before it started; it may still run "
                        "once in a worker, and that result is dropped"
                    )
                )
                return True
            time.sleep(0.001)
        return False

    def terminate(self) -> None:
        """Stop now: cancel queued tasks, end the workers, and return when they are gone.

        Tasks that were running fail with `PoolTerminatedError` (they are not
        sent again). Idempotent; `submit` afterwards raises.
        """
        with self._lock:
            self._shut_down = True
            self._terminating = True
            self._not_full.notify_all()
            pending = list(self._outstanding.values())
        for future in pending:
            future.cancel()
        for pid in self.worker_pids():
            _loky.kill_worker(pid)
        self.dispose(wait=True)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Return an iterator of ``fn`` over the iterables, in order.

        As ``Executor.map``, with one difference for a bounded pool
        (``max_pending`` set): it submits only as many tasks as the pool can
        hold and submits the rest as results are consumed, so an unbounded
        input is never read ahead. ``chunksize > 1`` sends that many calls per
        task. ``timeout`` counts from this call.

        Raises:
            ValueError: ``chunksize`` < 1.
            TimeoutError: (on iteration) a result was not ready in time.
            Exception: (on iteration) whatever ``fn`` raised.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        end_time = None if timeout is None else timeout + time.monotonic()
        calls: Iterator[tuple[Any, ...]] = zip(*iterables)
        if chunksize > 1:
            chunks = iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
            tasks: Iterator[Future[Any]] = (self.submit(run_chunk, fn, c) for c in chunks)
        else:
            tasks = (self.submit(fn, *args) for args in calls)
        window = None if self._max_pending is None else max(1, self._capacity())
        submitted: deque[Future[Any]] = deque(itertools.islice(tasks, window))
        return self._map_results(submitted, tasks, end_time, chunked=chunksize > 1)

    @staticmethod
    def _map_results(
        submitted: deque[Future[Any]],
        tasks: Iterator[Future[Any]],
        end_time: float | None,
        *,
        chunked: bool,
    ) -> Iterator[Any]:
        # A generator of its own, so that map() submits its first window now.
        # It keeps no reference to a result it has handed out (nor to its
        # future), as Executor.map does: results go out by list.pop().
        try:
            while submitted:
                results = _result_or_cancel(submitted.popleft(), end_time)
                if not chunked:
                    results = [results]
                # Keep the pool fed before handing the result out.
                submitted.extend(itertools.islice(tasks, 1))
                results.reverse()
                while results:
                    yield results.pop()
        finally:
            for future in submitted:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and release the workers (``Executor.shutdown``).

        With ``cancel_futures``, tasks that have not started are cancelled.
        With ``wait``, blocks until accepted work is done and the worker
        processes and helper threads are gone; otherwise returns at once and
        the work still finishes. Calls `dispose`, so a subclass's shared data
        is released too. Idempotent.
        """
        if cancel_futures:
            with self._lock:
                self._shut_down = True
                pending = list(self._outstanding.values())
            for future in pending:
                future.cancel()
        self.dispose(wait=wait)

    def dispose(self, wait: bool = True) -> None:
        # _dispose_lock makes a second caller wait until the first has joined
        # the workers, so that "dispose returned" always means "they are gone".
        with self._dispose_lock:
            self._dispose(wait)

    def _dispose(self, wait: bool) -> None:
        with self._lock:
            self._shut_down = True
            self._not_full.notify_all()  # blocked submitters raise PoolShutDownError
            if not wait:
                executors = [self._executor] if self._executor is not None else []
            else:
                while self._outstanding:
                    self._drained.wait()
                executors = [*self._old_executors]
                if self._executor is not None:
                    executors.append(self._executor)
                self._old_executors = []
                self._executor = None
        for executor in executors:
            executor.shutdown(wait=wait)
        if wait and self._budget is not None:
            self._budget.unregister(self)  # its places return to the budget
        if wait and self._slot_dir is not None:
            shutil.rmtree(self._slot_dir, ignore_errors=True)
        if wait and executors:
            # loky kills the workers of a broken executor without joining
            # them, so each stays in multiprocessing's table of children,
            # holding its sentinel pipe, until something reaps it (the next
            # process start does). Reap them now: "they are gone" means gone.
            multiprocessing.active_children()

    # -- internals -------------------------------------------------------

    def _capacity(self) -> int:
        assert self._max_pending is not None
        return max(1, self.worker_count) + self._max_pending

    def _live_executor(self) -> _loky.LokyExecutor:
        """The executor to submit to, built or grown as needed. Holds _lock."""
        if self._granted == 0:
            self._granted = 1  # a pool must be able to make progress
        workers = self.worker_count
        budget = self._budget
        if budget is not None:
            # What the budget allows (its lock is innermost); 0: tasks wait.
            workers = budget.allowed(self)
        executor = self._executor
        if executor is not None and executor.broken:
            self._old_executors.append(executor)
            executor = self._executor = None
        if executor is None:
            self._join_finished_executors()
            if self._slot_dir is None:
                _live_pools.add(self)
                self._slot_dir = _make_slot_dir()
                make_retire_counter(self._slot_dir)
                weakref.finalize(self, shutil.rmtree, self._slot_dir, ignore_errors=True)
            executor = self._executor = _loky.LokyExecutor(
                max_size=self._max_size,
                workers=workers,
                idle_timeout=self._idle_timeout,
                context=self._context,
                initializer=start_worker,
                initargs=(
                    os.getpid(),
                    self._slot_dir,
                    self._limits,
                    self._initializer,
                    self._initargs,
                ),
                env=self._env,
            )
        elif executor.workers < workers or (budget is not None and executor.workers != workers):
            executor.set_workers(workers)
        return executor

    def _worker_crashed(
        self, future: _TaskFuture, executor: _loky.LokyExecutor
    ) -> BaseException | None:
        """A worker of ``executor`` died and loky failed ``future`` with the rest.

        Runs in loky's manager thread, before loky kills the surviving
        workers, so the dead ones are exactly the culprits. Returns the error
        that ``future`` fails with if it was running in a dead worker (or has
        been torn down too often); otherwise sends it again and returns None.
        """
        with self._lock:
            lost, running = self._crash_report(executor)
            blind_crashes = self._blind_crashes
        self._emit_worker_events()
        if self._terminating:
            return PoolTerminatedError("the pool was terminated while this task was running")
        culprit = lost.get(future.task_id)
        if culprit is not None:
            return self._lost_error(future, *culprit)
        if blind_crashes >= MAX_ATTEMPTS:
            return WorkerPoolBrokenError(
                f"the pool's workers died {blind_crashes} times in a row before running any "
                "task (a failing initializer, or a worker killed as it starts?); the task "
                "was not run"
            )
        if future.task_id not in running:
            return self._send_again(future)  # it had not started: no harm done
        if future.attempts >= MAX_ATTEMPTS:
            return WorkerPoolBrokenError(
                f"the task was torn down {future.attempts} times by other workers dying; "
                "it was not run again"
            )
        future.attempts += 1
        return self._send_again(future)

    def _lost_error(
        self,
        future: _TaskFuture,
        pid: int,
        exitcode: int | None,
        killed: bool,
        reason: int,
        detail: int,
    ) -> BaseException:
        """The error for a task that died with its worker, by how the worker died."""
        if killed:
            return TaskKilledError.for_worker(pid, exitcode)
        if reason == DEADLINE:
            timeout = detail / 1000
            return TaskTimeoutError(
                f"the task ran past its {timeout:g}s deadline; its worker process {pid} was "
                "ended and replaced",
                pid=pid,
                timeout=timeout,
            )
        if reason == MEMORY:
            limit = self._limits.kill_memory or 0
            return WorkerMemoryError(
                f"worker process {pid} reached {_megabytes(detail)} of memory, above "
                f"kill_worker_memory={_megabytes(limit)}, while running this task; it was "
                "ended and replaced",
                pid=pid,
                limit=limit,
                size=detail,
            )
        return WorkerLostError.for_worker(pid, exitcode)

    def _send_again(self, future: _TaskFuture) -> BaseException | None:
        try:
            with self._lock:
                replacement = self._live_executor()
            inner = replacement.submit(run_task, future._envelope())
        except BaseException as error:
            return error
        future._attach(inner, replacement)
        return None

    def _crash_report(
        self, executor: _loky.LokyExecutor
    ) -> tuple[dict[int, tuple[int, int | None, bool, int, int]], set[int]]:
        """What ``executor``'s workers were doing when it broke (holds _lock).

        Returns the tasks lost with the dead workers (task id -> pid, exit
        code, killed by kill_task) and the ids of every task a worker was
        running, dead or alive. Worked out once per broken executor.
        """
        report = executor.crash_report
        if report is None:
            slot_dir = self._slot_dir
            lost: dict[int, tuple[int, int | None, bool, int, int]] = {}
            running: set[int] = set()
            dead = executor.dead_workers()
            for pid in [*dead, *executor.worker_pids()]:
                task_id, reason, detail = read_slot(slot_dir, pid) if slot_dir else (0, 0, 0)
                if task_id:
                    running.add(task_id)
                if pid in dead:
                    killed_for = self._kills.pop(pid, None)
                    killed = bool(task_id) and killed_for == task_id
                    if task_id:
                        lost[task_id] = (pid, dead[pid], killed, reason, detail)
                    why = (
                        "kill_task"
                        if killed
                        else "task_timeout"
                        if reason == DEADLINE
                        else "kill_worker_memory"
                        if reason == MEMORY
                        else describe_exit(dead[pid])
                    )
                    self._worker_events.append(("worker_lost", pid, why))
                    if slot_dir:
                        _remove_slot(slot_dir, pid)
            self._blind_crashes = 0 if running else self._blind_crashes + 1
            report = executor.crash_report = (lost, running)
        return report

    def _worker_running(self, task_id: int) -> int | None:
        """The pid of the worker running ``task_id`` now, if any."""
        slot_dir = self._slot_dir
        if slot_dir is None:
            return None
        for pid in self.worker_pids():
            if read_slot(slot_dir, pid)[0] == task_id:
                return pid
        return None

    def _join_finished_executors(self) -> None:
        still_running = []
        for old in self._old_executors:
            if old.finished:
                old.shutdown(wait=True)  # quick: its manager thread has exited
            else:
                still_running.append(old)
        self._old_executors = still_running

    def _task_finished(self, future: _TaskFuture, outcome: int, count: int = 1) -> None:
        with self._lock:
            self._counts[outcome] += count
            self._outstanding.pop(future.task_id, None)
            if self._max_pending is not None:
                self._not_full.notify()
            budget = self._budget
            went_idle = not self._outstanding
            callbacks = []
            if went_idle:
                self._drained.notify_all()
                callbacks = list(self._idle_callbacks)
        # A pool waits for a worker (maybe this one's), or this pool's workers
        # are now free for a pool that could use more.
        if budget is not None and (budget.has_waiters or (went_idle and budget.has_shortfall)):
            budget.rebalance()
        for callback in callbacks:
            callback()

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else "open"
        return (
            f"<{type(self).__name__} {state} workers={self.worker_count}/{self._max_size} "
            f"unfinished={self.unfinished_tasks}>"
        )
