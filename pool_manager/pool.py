"""A pool of worker processes for one key: the ``WorkerPool`` interface and
``BaseWorkerPool``, its implementation.

A pool knows nothing of keys, leases or expiry (that is the manager's job).
It owns: its worker processes (forked from the fork server, ``_process.py``),
how many of them it may run (``grant_workers``, the worker budget), its queue
of tasks, backpressure, and the futures it hands out.

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
(`_worker_started`) with its first batch, taken from the queue when it was
asked for. When tasks queue up, a worker gets several in one message, and
a few more than it is running (enough for about a millisecond of work, by
the measured task time), so that it never waits for the parent between
tasks.

One I/O loop serves every pool of the process (`_io_loop.py`): a pool with
live workers is attached to it, and the loop reads results, flushes output,
learns of worker exits from the fork server's status pipes, ends workers
past a deadline or ``kill_worker_memory``, and retires workers idle past
``idle_timeout``. A worker that dies takes only the task it was running;
the tasks sent to it but not started go back to the front of the queue.

A worker that cannot start (the system is out of descriptors, processes or
memory) is tried again with a back-off (the starter calls the pool back,
`_start_retry_due`): nothing sleeps under the pool's lock, and ``submit``
never waits for it. When it gives up, the queued tasks that no live worker
of the pool can take fail with `WorkerStartError`.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from concurrent.futures import Executor, Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypedDict, TypeVar

from . import _process, _signals, _threads
from ._compat import ProcessView, resolve_start_method
from ._dispatch import RunTimes, batch_size, task_kind
from ._durations import Duration, to_bytes, to_count, to_seconds, wait_step
from ._io_loop import get_loop
from ._map import OpenMaps, known_length, map_lazily
from ._protocol import (
    BUDGET,
    DEADLINE,
    ERROR,
    EXIT,
    EXIT_REASONS,
    IDLE,
    INIT_FAILED,
    INITIALIZER,
    LEAVING,
    MEMORY,
    READY,
    RESULT,
    SHUTDOWN,
    STARTED,
    STATUS,
    TASKS,
    TASKS_META,
    TO_WORKER,
    Message,
    MessageReader,
    dump_call,
    load_outcome,
)
from ._starter import get_starter
from ._worker import (
    WorkerConfig,
    WorkerLimits,
    dump_config,
    init_message,
    run_chunk,
    run_chunk_single,
)
from .budget import BudgetReport
from .errors import (
    ForkServerError,
    PoolShutDownError,
    PoolTerminatedError,
    ResultTimeoutError,
    TaskKilledError,
    TaskTimeoutError,
    UsedAfterForkError,
    WorkerLostError,
    WorkerMemoryError,
    WorkerPoolBrokenError,
    WorkerStartError,
    describe_exit,
)
from .memory import resident_memory

if TYPE_CHECKING:
    from .budget import BusySlots, PlacedPool, WorkerBudget

__all__ = ["DEFAULT_IDLE_TIMEOUT", "BaseWorkerPool", "TaskCounts", "WorkerPool"]

T = TypeVar("T")
V = TypeVar("V")
P = ParamSpec("P")

logger = logging.getLogger("pool_manager")

#: Seconds an idle worker process waits for work before it exits; the next
#: submit starts it again. ``None`` keeps workers until the pool is disposed.
DEFAULT_IDLE_TIMEOUT: float = 300.0


#: How many workers in a row may end before finishing a task (a failing
#: initializer, workers killed as they start) before the queued tasks fail.
MAX_ATTEMPTS = 3

#: Seconds between two checks of a pool's workers against ``kill_worker_memory``.
MEMORY_CHECK_INTERVAL = 0.05

#: A worker that cannot start for want of what the system may soon have
#: again (descriptors, processes, memory: EMFILE, ENFILE, EAGAIN, ENOMEM) is
#: tried again after this many seconds, then twice as long each time, up to
#: ``START_RETRY_MAX`` ...
START_RETRY_FIRST = 0.05
START_RETRY_MAX = 1.0
#: ... for this many seconds after the first failure in a row; then the
#: queued tasks that no live worker of the pool can take fail with
#: `WorkerStartError`, and the next submit tries again. Other failures (a
#: fork server that dies as it boots) fail those tasks at once.
START_RETRY_WINDOW = 10.0
_TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS}
)


class WorkerPool(Executor, abc.ABC):
    """What a `WorkerPoolManager` needs of a pool, on top of ``Executor``.

    Factories return instances of this class; in practice a subclass of
    `BaseWorkerPool`. Everything here is safe to call from any thread.
    """

    #: A label for progress bars and logs: a manager sets it to ``str(key)``
    #: on the pools it builds.
    name: str | None = None

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; returns its ``Future`` (``Executor.submit``)."""
        raise NotImplementedError

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await pool.run(fn, *args, **kwargs)``: submit, and await the result.

        Never blocks the event loop: a pool full under backpressure is
        waited for on a thread. Cancelling the awaiting task cancels the
        submission if it has not started (a started task runs to its end;
        see `BaseWorkerPool.kill_task`).

        Raises:
            Exception: whatever ``fn`` raised, or the pool's own errors.
        """
        import asyncio  # (on first use: the package itself never needs it)

        future = self._submit_nowait(fn, args, kwargs)
        if future is None:
            future = await _submit_on_a_thread(self, fn, args, kwargs)
        return await asyncio.wrap_future(future)

    def _submit_nowait(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[T] | None:
        """`submit`, or None if it would block (the default: it might, so None)."""
        return None

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: bool | str = False,
    ) -> Iterator[T]:
        """``Executor.map``, with a progress bar if ``progress`` (see `BaseWorkerPool.map`).

        Raises:
            ModuleNotFoundError: ``progress`` asked for and tqdm is not installed.
        """

        def start() -> Iterator[T]:
            return super(WorkerPool, self).map(fn, *iterables, timeout=timeout, chunksize=chunksize)

        if not progress:
            return start()
        from .progress import with_progress

        return with_progress(start, progress, self.name, known_length(iterables), "item")

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

    @property
    def unfinished_maps(self) -> int:
        """Lazy ``map`` iterators of this pool not yet exhausted, closed or collected.

        A manager never disposes a pool that has one (nor counts it idle),
        as it would a pool with unfinished tasks. Reads no lock. The default
        (``Executor.map`` submits everything at once) has none.
        """
        return 0

    @abc.abstractmethod
    def worker_pids(self) -> list[int]:
        """Pids of this pool's live worker processes."""

    @abc.abstractmethod
    def add_idle_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` each time `unfinished_tasks` drops to zero.

        It runs on whichever thread finished the last task: keep it short.
        What it raises is logged and ignored (on the library's own threads,
        even a ``BaseException``): the pool's futures settle regardless.
        """

    def add_worker_event_callback(self, callback: Callable[[str, int, str], object]) -> None:
        """Call ``callback(kind, pid, reason)`` when a worker is lost (``kind="worker_lost"``).

        What it raises is logged and ignored. The default never calls it.
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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # A Ctrl-C leaving the block must not wait for the backlog: stop now.
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.shutdown(wait=True)

    @abc.abstractmethod
    def dispose(self, wait: bool = True) -> None:
        """Stop accepting work, let accepted work finish, then stop the workers.

        Idempotent. With ``wait``, blocks until the work is done and the
        worker processes and helper threads are gone. Subclasses that hold
        shared data release it here, after calling ``super().dispose(wait)``.
        """


class TakenOnAThread(Generic[V]):
    """Hands what a thread took (a lease, a submission) to a coroutine, or undoes it.

    The coroutine may be cancelled while its thread is still at work:
    whichever comes second of the thread's result and the cancellation
    undoes it (``undo(value)``), with no event loop needed (it may be
    closed by then).
    """

    def __init__(self, undo: Callable[[V], object]) -> None:
        self._undo = undo
        self._lock = threading.Lock()
        self._value: V | None = None
        self._abandoned = False

    def keep(self, value: V) -> V | None:
        """(On the thread) the value, or None if the coroutine has given up (undone)."""
        with self._lock:
            if not self._abandoned:
                self._value = value
                return value
        self._undo(value)
        return None

    def abandon(self) -> None:
        """(On cancellation) undo the value, now if it is here, else when it comes."""
        with self._lock:
            self._abandoned = True
            value, self._value = self._value, None
        if value is not None:
            self._undo(value)


async def _submit_on_a_thread(
    pool: WorkerPool, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[T]:
    """`WorkerPool.submit` on a thread, for `WorkerPool.run` (a submit that may block)."""
    import asyncio

    taken: TakenOnAThread[Future[T]] = TakenOnAThread(lambda future: future.cancel())
    try:
        future = await asyncio.to_thread(lambda: taken.keep(pool.submit(fn, *args, **kwargs)))
    except asyncio.CancelledError:
        taken.abandon()  # the submission, made now or later, is cancelled
        raise
    assert future is not None
    return future


class _TaskFuture(_threads.GuardedCallbacksFuture):
    """The future `BaseWorkerPool.submit` returns.

    It settles only after the pool has counted the task as finished. Until
    the task is dispatched to a worker it can be cancelled; once dispatched
    it is *running*, as a ``ProcessPoolExecutor`` task in its call queue.
    Its done-callbacks run on the pool's strand of the callback threads, which they cannot end
    (`_threads.GuardedCallbacksFuture`). It holds its pool until it settles,
    then weakly: finished futures kept by a caller do not keep a dropped pool
    (and its workers) alive.
    """

    def __init__(
        self, pool: BaseWorkerPool, task_id: int, payload: bytes, timeout: float | None
    ) -> None:
        super().__init__()
        self._pool: BaseWorkerPool | None = pool
        self._pool_ref = weakref.ref(pool)
        self.task_id = task_id
        self._timeout = timeout
        self._payload: bytes | None = payload  # kept until settled, to send again
        self._dispatched = False  # set_running_or_notify_cancel() was called
        self._dropped = False  # cancelled before dispatch, or abandoned (kill_task)
        #: The worker's run time of the task, in seconds, once it has run.
        self.run_time: float | None = None
        #: What kind of task it is, for the pool's estimate of its run time.
        self.kind: object = None

    def _finish(self, ok: bool, value: Any) -> None:
        self._payload = None
        self._pool = None
        if ok:
            self.set_result(value)
        else:
            self.set_exception(value)

    def _finish_quietly(self, ok: bool, value: Any) -> list[Callable[[Future[Any]], object]]:
        """`_finish` without running the done-callbacks: returns them (see `_finish_tasks`)."""
        self._payload = None
        self._pool = None
        return self.settle_quietly(ok, value)

    def cancel(self) -> bool:
        pool = self._pool
        if pool is None:
            return Future.cancel(self)  # (settled)
        if pool._cancel(self):
            self._pool = None
            return True
        return False


class _StartTrouble:
    """Workers of a pool fail to start (guarded by the pool's lock): since when,
    why, and when the starter tries again."""

    __slots__ = ("attempts", "error", "given_up", "retry_at", "since")

    def __init__(self, since: float, error: BaseException) -> None:
        self.since = since  #: time.monotonic() of the first failure in a row
        self.error = error  #: the last failure
        self.attempts = 0
        self.retry_at = since  #: time.monotonic() of the next try
        self.given_up = False  #: no more tries: fail what no live worker can take


class _Start:
    """A worker asked of the starter, not yet here (guarded by the pool's lock)."""

    __slots__ = ("batch", "place")

    def __init__(self, place: bool) -> None:
        self.place = place  #: it holds a place under max_busy_workers
        self.batch: list[_TaskFuture] = []  #: its first tasks, sent once it is here


def _worth_retrying(error: BaseException) -> bool:
    """A worker start failed for want of something the system may soon have again."""
    if isinstance(error, ForkServerError):
        return False  # it died as it booted: it would again
    if isinstance(error, OSError):
        return isinstance(error, _process.ForkServerGone) or error.errno in _TRANSIENT_ERRNOS
    return isinstance(error, RuntimeError)  # "can't start new thread": out of processes


class _Remains:
    """What a pool holds outside the Python heap (its workers' sockets and pipes,
    its place in the I/O loop, the fork server), for the pool's finalizer and
    the loop, so that a pool dropped without ``shutdown()`` is collected and
    lets go of them, as a ``ProcessPoolExecutor`` does. Changed under the
    pool's lock."""

    __slots__ = ("owner_pid", "server", "token", "workers")

    def __init__(self, workers: dict[int, _Worker]) -> None:
        self.token: int | None = None  # its token in the I/O loop, while attached
        self.server: _process.ForkServer | None = None  # held, from the first worker start
        self.workers = workers  # the pool's own dict of its live workers
        self.owner_pid = os.getpid()

    def collected(self) -> None:
        """The pool's finalizer: it may run on any thread, at any point (no lock, no wait).

        Attached to the I/O loop, the loop ends the workers and lets the
        server go (`abandoned`); else the server's hold is given back soon.
        """
        if os.getpid() != self.owner_pid:
            return  # (a forked child's copy: the parent's to release)
        token = self.token
        if token is not None:
            get_loop().abandon_nowait(token)
        elif self.server is not None:
            self.server = None
            _process.release_server_soon()

    def abandoned(self, selector: selectors.BaseSelector) -> None:
        """(The I/O loop, the pool collected) close every worker's socket and status
        pipe (an idle worker exits when its socket closes), let go of the fork server."""
        for worker in list(self.workers.values()):
            worker.close(selector)
        self.workers.clear()
        server, self.server = self.server, None
        if server is not None:
            # (Not on the loop: the last hold waits for the server to exit.)
            _threads.get_runner().run(_threads.Strand(), _process.release_server)


class _Worker:
    """The pool's side of one worker process (guarded by the pool's lock,
    but for its reader, which only the I/O loop touches)."""

    __slots__ = (
        "assigned",
        "deadline",
        "dying",
        "idle_since",
        "init_failed",
        "reader",
        "leaving",
        "outbuf",
        "pid",
        "holds_place",
        "owner",
        "place_since",
        "ready",
        "registered",
        "sent",
        "sock",
        "sock_done",
        "status",
        "status_done",
        "status_fd",
        "writing",
        "finished_tasks",
    )

    def __init__(
        self, pid: int, sock: socket.socket, status_fd: int, now: float, owner: int
    ) -> None:
        self.pid = pid
        self.owner = owner  # its pool's token in the I/O loop
        self.sock = sock
        self.status_fd = status_fd
        self.reader = MessageReader()
        self.outbuf: deque[memoryview] = deque()
        #: Tasks sent and not answered, in the order sent (so the first is
        #: the one running).
        self.assigned: deque[_TaskFuture] = deque()
        self.sent = 0
        self.finished_tasks = 0
        self.idle_since = now
        self.leaving: int | None = None  # why it was told to leave, or said it leaves
        #: The task that said it started (``STARTED``) and has a deadline:
        #: when it passes (time.monotonic()), the task's id, its timeout.
        self.deadline: tuple[float, int, float] | None = None
        #: Why the pool ended it (``DEADLINE``, ``MEMORY``): reason, task id, detail.
        self.dying: tuple[int, int, float] | None = None
        self.init_failed: tuple[int, str] | None = None  # the step that failed, traceback
        self.ready = False  # its initializer has run: it takes tasks from here on
        self.holds_place = False  # a place under max_busy_workers (BusySlots)
        self.place_since = 0.0  # time.monotonic() it took that place
        self.registered = False
        self.writing = False
        self.sock_done = False
        self.status_done = False
        self.status: int | None = None

    @property
    def ended(self) -> bool:
        return self.status_done and (self.sock_done or self.status is not None)

    def close(self, selector: selectors.BaseSelector) -> None:
        """Close the pool's end of its socket and its status pipe (once each)."""
        if not self.sock_done:
            self.sock_done = True
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.sock)
            self.sock.close()
        if not self.status_done:
            self.status_done = True
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.status_fd)
            with contextlib.suppress(OSError):
                os.close(self.status_fd)


_SUBMITTED, _COMPLETED, _FAILED, _CANCELLED = range(4)


class TaskCounts(TypedDict):
    """A pool's tasks, counted since it was built."""

    submitted: int  #: accepted by submit (or map)
    running: int  #: in a worker now
    queued: int  #: accepted, not started
    completed: int  #: finished with a result
    failed: int  #: finished with an exception (the task's own, or a lost worker)
    cancelled: int


#: Pools that have started workers, for the exit hooks (_signals.py).
_live_pools: weakref.WeakSet[BaseWorkerPool] = weakref.WeakSet()
_signals.configure_pools(lambda: list(_live_pools))
#: The pools with unfinished tasks: held here, so that a pool dropped with
#: work still does it (its futures settle, their callbacks run), as a
#: ``ProcessPoolExecutor`` does; once idle, a pool nothing refers to is
#: collected (see `_Remains`).
_busy_pools: set[BaseWorkerPool] = set()
#: Every pool of this process, for the fork hook below.
_all_pools: weakref.WeakSet[BaseWorkerPool] = weakref.WeakSet()


def _inert_in_forked_child() -> None:
    """(In a child just forked from this process) what it inherited goes inert.

    Each pool's sockets and pipes belong to the parent's workers and I/O
    thread: the child closes its copies (so the fork server and the workers
    still see the parent go, and a child never reads the parent's replies),
    and the exit hook no longer sees the pools. Using one raises
    `UsedAfterForkError`; shutting one down does nothing. No lock is taken:
    another thread of the parent may have held one at the fork.
    """
    for pool in list(_all_pools):
        pool._close_inherited()
    _live_pools.clear()
    _all_pools.clear()
    _busy_pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_inert_in_forked_child)


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _grant_places(pools: list[PlacedPool]) -> None:
    """Tell each pool handed a place under ``max_busy_workers`` (no lock held)."""
    for pool in pools:
        pool.place_granted()


def _worker_env(env: object) -> dict[bytes, bytes] | None:
    """Check a pool's ``env`` (str keys and values, as ``subprocess`` wants them);
    returns it as ``os.environb`` holds it.

    Raises:
        TypeError: not a mapping, or a key or value that is not a str.
        ValueError: a name that is empty or holds ``=``, a NUL character, or
            text the file system encoding cannot hold.
    """
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a dict of str to str, not {type(env).__name__}")
    converted = {}
    for key, value in env.items():
        for part in (key, value):
            if not isinstance(part, str):
                raise TypeError(
                    f"env keys and values must be str, not {type(part).__name__} "
                    f"(in {key!r}: {value!r})"
                )
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"env: illegal environment variable {key!r}: {value!r}")
        try:
            converted[os.fsencode(key)] = os.fsencode(value)
        except UnicodeError as error:
            raise ValueError(f"env: {key!r}: {value!r} cannot be encoded: {error}") from error
    return converted


class _Bounded(Protocol):
    """What `wait_for_room` needs of a pool with backpressure (its lock held)."""

    _shut_down: bool
    _blocked_submits: int
    _not_full: threading.Condition

    @property
    def _outstanding(self) -> Sized: ...

    def _capacity(self) -> int: ...


def wait_for_room(pool: _Bounded, deadline: float | None, block: bool = True) -> bool:
    """(Holds the pool's lock) wait until ``pool`` has room for one more task.

    Returns False, without waiting, if there is none and ``block`` is false.
    Never waits on a thread that must not stall (the task is admitted beyond
    ``max_pending``: see `BaseWorkerPool.submit`), nor past ``deadline`` (a
    ``time.monotonic()`` time; then `ResultTimeoutError`). Signalled on
    ``_not_full`` by a task finishing, a grant and shutdown.
    """
    while not pool._shut_down and len(pool._outstanding) >= pool._capacity():
        if not block:
            return False
        if _threads.must_not_stall():
            return True  # admitted beyond max_pending
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ResultTimeoutError(
                "map: the pool stayed full (max_pending) until the timeout; "
                "the tasks not started were cancelled"
            )
        pool._blocked_submits += 1
        try:
            pool._not_full.wait(wait_step(left))
        finally:
            pool._blocked_submits -= 1
    return True


class BaseWorkerPool(WorkerPool):
    """A process pool for one key, and a drop-in ``ProcessPoolExecutor``.

    ``BaseWorkerPool(4)`` behaves like ``ProcessPoolExecutor(4)``: up to four
    worker processes, started as tasks find none idle, fed in order.
    Submissions travel with cloudpickle, so lambdas and closures work.

    Args:
        max_size: the most worker processes (``ProcessPoolExecutor``'s
            ``max_workers``, which is accepted as another name for it).
            Default: the CPUs this process may use.
        initializer, initargs: run ``initializer(*initargs)`` once in each
            worker process, to give it its own state (a model, a connection).
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
            size = _process.cpu_count()
        elif isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"max_workers must be an int, not {type(size).__name__}")
        elif size <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        self._env = _worker_env(env)
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
        self._limits = WorkerLimits(max_tasks, soft_memory)
        self._kill_memory = hard_memory
        self._next_memory_check = 0.0  # time.monotonic(), for kill_worker_memory
        self._task_timeout = to_seconds("task_timeout", task_timeout, allow_none=True)
        self._max_size: int = size
        self._max_pending = max_pending
        self._idle_timeout = to_seconds("idle_timeout", idle_timeout, allow_none=True)
        self._start_method = resolve_start_method(mp_context)
        config = WorkerConfig(
            self._limits,
            initializer,
            initargs,
            bytes(multiprocessing.current_process().authkey),
        )
        try:
            self._config = dump_config(config)
        except Exception as error:
            raise TypeError(f"the initializer and initargs must be picklable: {error}") from error

        # _lock guards everything below; the conditions share it.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)  # backpressure waiters
        self._blocked_submits = 0  # submit calls waiting on _not_full
        self._drained = threading.Condition(self._lock)  # waiters for no unfinished work
        #: Waiters for the last worker to be gone (none starting, none attached to the loop).
        self._io_done = threading.Condition(self._lock)
        self._outstanding: dict[int, _TaskFuture] = {}  # unfinished, by task id
        self._pending: deque[_TaskFuture] = deque()  # accepted, not dispatched
        self._workers: dict[int, _Worker] = {}  # live (leaving included), by pid
        self._task_ids = itertools.count(1)
        self._kills: dict[int, int] = {}  # pid -> id of the task kill_task killed it for
        self._exit_reasons: dict[int, str] = {}  # pid -> why it left cleanly, until asked
        self._fruitless = 0  # workers in a row that ended without finishing a task
        #: Each kind of task's run time (see _dispatch).
        self._estimates = RunTimes()
        self._terminating = False
        self._counts = [0, 0, 0, 0]  # submitted, completed, failed, cancelled
        self._worker_event_callbacks: list[Callable[[str, int, str], object]] = []
        self._worker_events: list[tuple[str, int, str]] = []  # to emit outside _lock
        self._granted: int | None = None  # None: not granted piecemeal, all usable
        self._shut_down = False
        self._idle_callbacks: list[Callable[[], object]] = []
        self._open_maps = OpenMaps()  # lock-free (see OpenMaps)
        self._dispose_lock = threading.Lock()
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
        #: pool is inert (see _inert_in_forked_child).
        self._owner_pid = os.getpid()
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
        self._check_owner()
        to_count("send_size", count, minimum=0)
        with self._lock:
            self._granted = min(self._max_size, (self._granted or 0) + count)
            self._not_full.notify_all()  # more workers: more room under backpressure
            self._dispatch()
            granted = self._granted
        self._after_unlock()
        return granted

    @property
    def unfinished_tasks(self) -> int:
        return len(self._outstanding)

    @property
    def unfinished_maps(self) -> int:
        return len(self._open_maps)

    def worker_pids(self) -> list[int]:
        if self._inherited():
            return []  # (the parent's workers)
        with self._lock:
            return list(self._workers)

    def add_idle_callback(self, callback: Callable[[], object]) -> None:
        with self._lock:
            self._idle_callbacks.append(callback)

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

    def task_counts(self) -> TaskCounts:
        self._check_owner()
        with self._lock:
            submitted, completed, failed, cancelled = self._counts
            unfinished = len(self._outstanding)
            running = sum(1 for w in self._workers.values() if w.assigned)
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

    def attach_budget(self, budget: WorkerBudget | None, busy: BusySlots | None = None) -> bool:
        """Run this pool's workers under a manager's ``max_total_workers`` (``budget``)
        and ``max_busy_workers`` (``busy``).

        Only before the pool's first submit; returns False (and changes
        nothing) once it has run work, or if it already has them.
        """
        self._check_owner()
        with self._lock:
            if self._budget is not None or self._busy_slots is not None:
                return False
            if self._shut_down or self._counts[_SUBMITTED]:
                return False
            if budget is not None and budget.limit is not None:
                self._budget = budget
                self._allowed = 0
            self._busy_slots = busy if busy is not None and busy.limit is not None else None
        if self._budget is not None:
            self._budget.register(self)
        return True

    # For the caps across keys only, not for users: the pool's side of
    # `budget.BudgetedPool` (budget_report, apply_allowance, last_submit) and
    # of `budget.PlacedPool` (place_granted, with the dispatch below), whose
    # docstrings hold the contract.

    def budget_report(self) -> BudgetReport:
        """(For the budget) workers granted, workers it could use now, live
        workers, and those of them not told to leave."""
        want = self.worker_count
        with self._lock:
            unfinished = len(self._outstanding)
            live = len(self._workers) + len(self._starts)
            active = self._active()
        return BudgetReport(want=want, demand=min(want, unfinished), live=live, active=active)

    def apply_allowance(self) -> None:
        """(For the budget) take the new allowance. Never under its lock.

        The pool matches it from then on, at every dispatch (`_shed_surplus`):
        the budget gives orders as a level to reach, not as steps to take, so
        an order that finds the pool changed since it was planned still holds.
        """
        budget = self._budget
        if budget is None:
            return
        allowed = budget.allowed(self)
        with self._lock:
            self._allowed = allowed
            self._dispatch()
        self._after_unlock()

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

    @property
    def is_shut_down(self) -> bool:
        """True once `shutdown` or `dispose` was called."""
        return self._shut_down

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
        fork server). If no worker can start (see `START_RETRY_WINDOW`), the
        future fails with `WorkerStartError`; ``submit`` itself does not wait
        for the retries.

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
        """Submit; with ``block`` False, None instead of waiting for room.

        ``deadline`` (a ``time.monotonic()`` time): wait for room until then,
        and raise ``TimeoutError`` if the pool is still full.
        """
        self._check_owner()
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
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
        kind = task_kind(fn, args)
        with self._lock:
            if self._max_pending is not None and not wait_for_room(self, deadline, block):
                return None
            if self._shut_down:
                raise PoolShutDownError("cannot schedule new futures after shutdown")
            task_id = next(self._task_ids)
            self.last_submit = time.monotonic()
            future = _TaskFuture(self, task_id, payload, timeout)
            future.kind = kind
            self._outstanding[task_id] = future
            if len(self._outstanding) == 1:
                _busy_pools.add(self)  # (kept alive while it has work)
            self._counts[_SUBMITTED] += 1
            self._pending.append(future)
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
                self._dispatch()
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
        with self._lock:
            self._shut_down = True
            self._terminating = True
            self._not_full.notify_all()
            pending = list(self._pending)
            pids = list(self._workers)
        for future in pending:
            future.cancel()
        for pid in pids:
            _process.kill_worker(pid)
        self.dispose(wait=True)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool | str = False,
    ) -> Iterator[T]:
        """Return an iterator of ``fn`` over the iterables, in order.

        As ``Executor.map``, with an automatic ``chunksize`` when none is
        given: an input with a length is cut into about
        ``CHUNKS_PER_WORKER`` chunks per worker; an input without one (a
        generator) is read a bounded window ahead, in chunks sized by the
        measured time of each call, and more is read as results are
        consumed, so an unbounded input never fills memory. A bounded pool
        (``max_pending`` set) also submits only what it can hold. ``timeout``
        counts from this call, also while the pool is full: once it has
        passed, ``TimeoutError`` is raised (by the call itself if its first
        submissions wait that long for room, else on iteration), and the
        tasks the map submitted that have not started are cancelled.

        ``progress`` (True, or the bar's description) draws a tqdm progress
        bar (the extra ``pool-manager[progress]``) that advances as results
        are handed out, described by the pool's `name` (a manager's key);
        its total is the input's length when it has one.

        Raises:
            ValueError: ``chunksize`` < 1.
            ModuleNotFoundError: ``progress`` asked for and tqdm is not installed.
            ResultTimeoutError: a result was not ready in time, or the pool
                stayed full until the timeout (a ``TimeoutError`` and a
                ``concurrent.futures.TimeoutError``, also on 3.10).
            Exception: (on iteration) whatever ``fn`` raised.
        """
        single_runner = run_chunk_single if len(iterables) == 1 else run_chunk
        return map_lazily(
            fn,
            iterables,
            submit=self._submit_by,
            submit_chunk=lambda deadline, chunk: self._submit_by(
                deadline, single_runner, (fn, chunk)
            ),
            timeout=timeout,
            chunksize=chunksize,
            workers=max(1, self.worker_count),
            window=None if self._max_pending is None else max(1, self._capacity()),
            progress=progress,
            name=self.name,
            open_maps=self._open_maps,
        )

    def _submit_by(
        self, deadline: float | None, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> Future[T]:
        """`submit` for `map`: waits for room only until ``deadline`` (then ``TimeoutError``)."""
        future = self._submit(self._task_timeout, fn, args, {}, deadline=deadline)
        assert future is not None
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and release the workers (``Executor.shutdown``).

        With ``cancel_futures``, tasks that have not started are cancelled.
        With ``wait``, blocks until accepted work is done and the worker
        processes and the pool's thread are gone; otherwise returns at once
        and the work still finishes. Calls `dispose`, so a subclass's shared
        data is released too. Idempotent.
        """
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        if cancel_futures:
            with self._lock:
                self._shut_down = True
                pending = list(self._pending)
            for future in pending:
                future.cancel()
        self.dispose(wait=wait)

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
            self._shut_down = True
            self._not_full.notify_all()  # blocked submitters raise PoolShutDownError
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
        _live_pools.discard(self)
        if self._busy_slots is not None:
            self._return_places()
            _grant_places(self._busy_slots.leave(self))
        if self._budget is not None:
            self._budget.unregister(self)  # its places return to the budget

    # -- dispatch (all under _lock) ------------------------------------------

    def _capacity(self) -> int:
        assert self._max_pending is not None
        return max(1, self.worker_count) + self._max_pending

    def _worker_limit(self) -> int:
        if self._granted == 0:
            self._granted = 1  # a pool must be able to make progress
        allowed = self._allowed
        return self.worker_count if allowed is None else allowed

    def _wants_workers(self) -> bool:
        """(For the budget) it could use more workers than it is allowed now.

        Not when its allowance has room (it starts workers itself), nor when
        the allowance is unused for want of a place under ``max_busy_workers``.
        """
        active = self._active()
        if active < (self._allowed or 0):
            return False
        return active < min(self.worker_count, len(self._outstanding))

    def _active(self) -> int:
        """(Holds _lock) Workers that take tasks: live and not told to leave, or starting."""
        return len(self._starts) + sum(1 for w in self._workers.values() if w.leaving is None)

    def _dispatch(self, start: bool = True) -> None:
        """Hand queued tasks to workers, starting workers as allowed.

        Under ``max_busy_workers`` (`BusySlots`), an idle worker needs a place
        before it is handed work; when a worker gives its place back, and
        which busy worker may be handed more, is `BusySlots`' policy
        (`BusySlots.places_to_release`, `budget.PlaceRules`): this applies it.
        With ``start`` false (just after a failed start), no worker is started.
        """
        if self._allowed is not None and len(self._workers) + len(self._starts) > self._allowed:
            self._shed_surplus(self._allowed)
        pending = self._pending
        if pending and not self._outstanding:
            pending.clear()  # (what is left was cancelled: each task queued is outstanding)
        if pending and not self._terminating:
            self._dispatch_pending(pending, start)
        busy = self._busy_slots
        if busy is None:
            return
        more_coming = bool(pending or self._blocked_submits)
        for worker in busy.places_to_release(self._workers.values(), more_coming):
            worker.holds_place = False
            self._places_to_return += 1

    def _shed_surplus(self, allowed: int) -> None:
        """More workers than the budget allows: the idle ones above it leave now.

        The busy ones above it leave as they go idle (each dispatch looks
        again), and are handed no more work meanwhile (`_dispatch_pending`).
        """
        surplus = self._active() - allowed
        for worker in list(self._workers.values()):
            if surplus <= 0:
                return
            if worker.leaving is None and not worker.assigned:
                self._retire(worker, BUDGET)
                surplus -= 1

    def _dispatch_pending(self, pending: deque[_TaskFuture], may_start: bool) -> None:
        limit = self._worker_limit()
        max_tasks = self._limits.max_tasks
        busy = self._busy_slots
        now = time.monotonic()
        rules = None if busy is None else busy.rules(self, now)
        if rules is not None:
            for idle_worker in rules.slice_over(self._workers.values()):
                idle_worker.holds_place = False
                self._places_to_return += 1
        while pending:
            depth = self._estimates.depth(pending[0].kind)
            active = len(self._starts)
            idle = None
            best = None  # the least loaded busy worker with room
            for candidate in self._workers.values():
                if candidate.leaving is not None:
                    continue
                active += 1
                held = len(candidate.assigned)
                if held >= depth or (max_tasks is not None and candidate.sent >= max_tasks):
                    continue
                if not held:
                    if idle is None or candidate.holds_place:
                        idle = candidate
                elif (rules is None or rules.may_hand_more(candidate)) and (
                    best is None or held < len(best.assigned)
                ):
                    best = candidate
            if active > limit:
                best = None  # shrinking: its busy workers leave as they go idle
            worker: _Worker | None = None
            start = None
            if idle is not None:
                # Without a place, it waits in line; a busy worker within
                # its time slice may still take more.
                worker = idle if self._take_place(idle) else best
            elif (
                may_start
                and active < limit
                and self._may_start(now)
                and (busy is None or busy.take(self))
            ):
                start = self._request_start(busy is not None)
                if start is not None:
                    active += 1
                else:
                    worker = best
            else:
                worker = best
            if worker is not None:
                room = depth - len(worker.assigned)
                if max_tasks is not None:
                    room = min(room, max_tasks - worker.sent)
            elif start is not None:
                # Its first batch is its own from now on (running, as with
                # ProcessPoolExecutor's call queue): sent once it is here.
                room = depth if max_tasks is None else min(depth, max_tasks)
            else:
                return
            count = batch_size(room, len(pending), active)
            batch: list[_TaskFuture] = []
            while pending and len(batch) < count:
                future = pending.popleft()
                if future._dropped:
                    continue
                if not future._dispatched:
                    if not future.set_running_or_notify_cancel():
                        continue
                    future._dispatched = True
                batch.append(future)
            if not batch:
                continue
            if worker is None:
                assert start is not None
                start.batch = batch
            else:
                if worker.place_since == math.inf:
                    worker.place_since = now  # (its first batch: see _add_worker)
                self._send_tasks(worker, batch)

    def _take_place(self, worker: _Worker) -> bool:
        """A place under ``max_busy_workers`` for idle ``worker`` (True without a cap)."""
        busy = self._busy_slots
        if busy is None or worker.holds_place:
            return True
        if busy.take(self):
            worker.holds_place = True
            worker.place_since = time.monotonic()
            return True
        return False

    def _return_places(self) -> None:
        """Give back the places of workers that went idle (call with no lock held)."""
        busy = self._busy_slots
        if busy is None:
            return
        with self._lock:
            count, self._places_to_return = self._places_to_return, 0
        _grant_places(busy.give_back(self, count))

    def place_granted(self) -> None:
        """(For `BusySlots`) a place was handed to this pool: use it, or hand it on."""
        with self._lock:
            self._dispatch()
        # Unconditionally: it also hands back a place handed to us and not taken.
        self._return_places()
        if self._undelivered:
            self._deliver_undelivered()

    def _send_tasks(self, worker: _Worker, batch: list[_TaskFuture]) -> None:
        worker.assigned.extend(batch)
        worker.sent += len(batch)
        payloads = [f._payload or b"" for f in batch]
        meta = pickle.dumps(
            [(f.task_id, f._timeout, len(p)) for f, p in zip(batch, payloads)],
            pickle.HIGHEST_PROTOCOL,
        )
        length = TASKS_META.size + len(meta) + sum(len(p) for p in payloads)
        head = TO_WORKER.pack(length, TASKS) + TASKS_META.pack(len(meta)) + meta
        self._send(worker, head, *payloads)

    def _send(self, worker: _Worker, *parts: bytes) -> None:
        """Send without blocking; what does not fit now, the I/O loop sends."""
        if worker.sock_done:
            return
        if not worker.outbuf:
            try:
                sent = worker.sock.sendmsg(parts)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the worker is gone: the I/O loop will see it
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                worker.outbuf.append(memoryview(part)[sent:])
                sent = 0
        else:
            worker.outbuf.extend(memoryview(part) for part in parts)
        if worker.outbuf and not worker.writing:
            self._io_changes.append(worker)
            self._wake()

    def _retire(self, worker: _Worker, reason: int) -> None:
        """Tell ``worker`` to leave once it has run what it holds."""
        if worker.leaving is None:
            worker.leaving = reason
            self._send(worker, TO_WORKER.pack(0, EXIT))

    def _retire_all(self) -> None:
        for worker in list(self._workers.values()):
            self._retire(worker, SHUTDOWN)

    def _request_start(self, place: bool) -> _Start | None:
        """(Holds _lock) Ask the starter for a worker (``place``: it holds a place
        under ``max_busy_workers``); it counts as live from now on. None if
        there is no thread to start it (a start failure, `_start_failed`)."""
        try:
            get_starter().request(self)
        except RuntimeError as error:
            self._places_to_return += place
            self._start_failed(error)
            return None
        start = _Start(place)
        self._starts.append(start)
        _live_pools.add(self)  # (for the exit hook: its worker is on its way)
        return start

    def _start_one(self) -> None:
        """(The starter's thread, no lock held) Fork one worker from the fork
        server, then file it (`_worker_started`)."""
        started: tuple[int, socket.socket, int] | None = None
        error: BaseException | None = None
        remains = self._remains
        try:
            server = remains.server  # (only this thread sets it while a start is on)
            if server is None:
                server = _process.acquire_server()
                with self._lock:
                    remains.server = server
            try:
                started = server.start_worker()
            except _process.ForkServerGone:
                server = _process.acquire_server(replace=server)
                with self._lock:
                    remains.server = server
                started = server.start_worker()
        except BaseException as failure:  # (a bug too: the pool must hear of it)
            error = failure
        self._worker_started(started, error)

    def _worker_started(
        self, started: tuple[int, socket.socket, int] | None, error: BaseException | None
    ) -> None:
        """(The starter's thread) A start asked for ended: file the new worker
        and dispatch, or count the failure (`_start_failed`)."""
        with self._lock:
            start = self._starts.popleft()
            place = start.place
            if started is not None:
                pid, sock, status_fd = started
                if self._io_token is None:
                    try:
                        token = get_loop().attach(self, self._remains)
                    except (OSError, RuntimeError) as failure:  # no loop to serve it
                        _process.kill_worker(pid)
                        sock.close()
                        os.close(status_fd)
                        started, error = None, failure
                    else:
                        self._io_token = self._remains.token = token
            if started is None:
                self._places_to_return += place
                self._requeue(start.batch)
                assert error is not None
                self._start_failed(error)
                # (Its tasks may go to live workers, but no other start is
                # tried now: after a retry's back-off, or the next submit.)
                self._dispatch(start=False)
            else:
                worker = self._add_worker(*started, place)
                batch = [f for f in start.batch if f.task_id in self._outstanding]
                if batch:
                    worker.place_since = time.monotonic()
                    self._send_tasks(worker, batch)
                self._dispatch()
            if not self._starts:
                self._io_done.notify_all()
        self._after_unlock()

    def _add_worker(self, pid: int, sock: socket.socket, status_fd: int, place: bool) -> _Worker:
        """(Holds _lock, attached to the loop) A worker has started: it is the pool's."""
        if self._start_trouble is not None:
            self._start_trouble = None  # (a retry due finds nothing to do)
        assert self._io_token is not None
        sock.setblocking(False)
        now = time.monotonic()
        worker = _Worker(pid, sock, status_fd, now, self._io_token)
        worker.holds_place = place
        # (Its time slice under max_busy_workers starts with its first batch:
        # a place is not given up before it was used.)
        worker.place_since = math.inf if place else now
        self._workers[pid] = worker
        _live_pools.add(self)
        # Made now: the worker gets the directory and environment of its start.
        self._send(worker, init_message(self._config, self._env))
        self._io_changes.append(worker)
        self._wake()
        if self._terminating:
            _process.kill_worker(pid)
        elif self._shut_down and not self._outstanding:
            self._retire(worker, SHUTDOWN)
        return worker

    # -- workers that fail to start --------------------------------------------

    def _may_start(self, now: float) -> bool:
        """(Holds _lock) No failed start waits for its retry (the starter calls it)."""
        trouble = self._start_trouble
        return trouble is None or (not trouble.given_up and now >= trouble.retry_at)

    def _start_failed(self, error: BaseException) -> None:
        """(Holds _lock) A worker did not start: the starter calls `_start_retry_due`
        after a back-off, or the pool gives up (`_give_up_starting`)."""
        now = time.monotonic()
        trouble = self._start_trouble
        if trouble is None:
            trouble = self._start_trouble = _StartTrouble(now, error)
            logger.warning("could not start a worker process: %s", error)
        else:
            logger.debug("could not start a worker process (again): %s", error)
        trouble.error = error
        trouble.attempts += 1
        if not _worth_retrying(error) or now - trouble.since >= START_RETRY_WINDOW:
            trouble.given_up = True
        else:
            backoff = START_RETRY_FIRST * 2 ** min(trouble.attempts - 1, 32)
            trouble.retry_at = now + min(START_RETRY_MAX, backoff)
            try:
                get_starter().call_at(trouble.retry_at, self)
                return
            except RuntimeError:
                pass  # no thread to try again later (out of threads): give up now
        self._give_up_starting(self._undelivered)

    def _give_up_starting(self, failures: list[tuple[_TaskFuture, bool | None, Any]]) -> None:
        """(Holds _lock) Stop retrying; fail the queued tasks unless a live worker will run them.

        The next worker wanted is tried at once.
        """
        trouble, self._start_trouble = self._start_trouble, None
        if trouble is None or any(w.leaving is None for w in self._workers.values()):
            return
        tried = time.monotonic() - trouble.since if trouble.attempts > 1 else 0.0
        self._fail_queued(WorkerStartError.for_cause(trouble.error, tried), failures)

    def _has_queued(self) -> bool:
        return any(not future._dropped for future in self._pending)

    def _start_retry_due(self) -> None:
        """(The starter's thread) A failed start's back-off is over: try again if a
        worker is still wanted, else stop (the next one wanted is tried at once)."""
        with self._lock:
            trouble = self._start_trouble
            if trouble is None or trouble.given_up or trouble.retry_at > time.monotonic():
                return  # (a worker started, or a later retry is due)
            if self._terminating or not self._has_queued():
                self._give_up_starting(self._undelivered)
            else:
                starting = len(self._starts)
                self._dispatch()
                if len(self._starts) == starting and self._start_trouble is trouble:
                    # No worker was wanted after all (one came free, or the
                    # budget said no): the next one wanted is tried at once.
                    self._start_trouble = None
        self._after_unlock()

    def _after_unlock(self) -> None:
        """What a change made under the lock leaves to do once it is released:
        places under ``max_busy_workers`` to give back, tasks failed to finish."""
        if self._places_to_return:
            self._return_places()
        if self._undelivered:
            self._deliver_undelivered()

    def _deliver_undelivered(self) -> None:
        """Finish the tasks failed where the lock was held (call with no lock held)."""
        with self._lock:
            done, self._undelivered = self._undelivered, []
        if done:
            self._finish_tasks(done)

    def _wake(self) -> None:
        """(Holds _lock) The I/O loop has something new of this pool's to look at."""
        if self._io_token is not None:
            get_loop().changed(self._io_token)

    def _drop_server(self) -> bool:
        with self._lock:
            if self._workers or self._starts or self._remains.server is None:
                return False
            self._remains.server = None
        _process.release_server()
        return True

    def _cancel(self, future: _TaskFuture) -> bool:
        with self._lock:
            if future._dispatched or future.done() or future._dropped:
                return Future.cancel(future)
            future._dropped = True
            self._outstanding.pop(future.task_id, None)
        self._finish_tasks([(future, None, None)])
        return True

    # -- on the I/O loop (_io_loop.py) -------------------------------------------

    def _io_round(self, selector: selectors.BaseSelector) -> float | None:
        """(I/O loop) Register new workers, enforce the limits.

        Returns how long the loop may wait for this pool (``math.inf``: until
        something happens); None once no worker is left: then the pool has
        left the loop (a later worker attaches it again).
        """
        with self._lock:
            self._apply_io_changes(selector)
            if not self._workers:
                self._io_token = self._remains.token = None
                self._io_changes.clear()
                self._io_done.notify_all()
                return None
            timeout = self._check_workers()
            watched, timeout = self._memory_check_due(timeout)
        if watched:
            self._check_memory(watched)
        return math.inf if timeout is None else timeout

    def _io_detached(self) -> None:
        """(I/O loop, no lock held) The pool has left the loop: a pool shut down
        with nobody waiting lets go of the fork server, on a callback thread
        (the last hold waits for the server to exit)."""
        with self._lock:
            if not self._shut_down or self._disposal_waits:
                return  # (a dispose(wait=True) lets it go itself, before it returns)
        _threads.get_runner().run(self._strand, self._drop_server)

    def _io_events(
        self, events: list[tuple[selectors.SelectorKey, int]], selector: selectors.BaseSelector
    ) -> None:
        """(I/O loop) Serve what the wait returned: sockets to read and write, exits."""
        messages: list[tuple[_Worker, Message]] = []
        ended: list[_Worker] = []
        for key, mask in events:
            worker = key.data
            if key.fileobj is worker.sock:
                if mask & selectors.EVENT_WRITE:
                    self._flush(worker, selector)
                if mask & selectors.EVENT_READ:
                    self._receive(worker, messages, selector)
            elif self._read_status(worker, selector):
                # Its exit status comes after all it wrote: read the rest.
                self._receive(worker, messages, selector, final=True)
            if worker.ended and worker not in ended:
                ended.append(worker)
        if messages or ended:
            self._handle(messages, ended)

    def _io_failed(self, error: BaseException, selector: selectors.BaseSelector) -> None:
        """The I/O loop met an unexpected error (a bug): end the workers, fail the tasks.

        Every unfinished task fails with `WorkerPoolBrokenError` (the error
        as its cause) rather than wait for an answer nobody would read. The
        pool stays usable: the next submit starts new workers, and a new
        attachment to the I/O loop.
        """
        logger.critical(
            "pool_manager: the I/O loop failed serving %r; ending its workers and failing its "
            "unfinished tasks",
            self,
            exc_info=error,
        )
        failure = WorkerPoolBrokenError(
            f"the I/O loop failed serving the pool ({type(error).__name__}: {error}), so the pool "
            "ended its worker processes and this task was lost; new tasks get new workers. "
            "This is a bug in pool_manager: please report it, with the logged traceback"
        )
        failure.__cause__ = error
        failures: list[tuple[_TaskFuture, bool | None, Any]] = []
        with self._lock:
            for worker in self._workers.values():
                _process.kill_worker(worker.pid)
                self._forget_worker(worker, selector)
                self._worker_events.append(("worker_lost", worker.pid, "the I/O loop failed"))
            self._workers.clear()
            self._io_changes.clear()
            self._kills.clear()
            self._fruitless = 0
            self._pending.clear()
            for future in self._outstanding.values():
                if not future._dispatched:
                    future._dispatched = future.set_running_or_notify_cancel()
                    if not future._dispatched:
                        continue
                failures.append((future, False, failure))
            self._outstanding.clear()
        try:
            if self._places_to_return:
                self._return_places()
        finally:
            self._finish_tasks(failures, worker_ended=True)  # (their places came free)
        self._emit_worker_events()

    def _forget_worker(self, worker: _Worker, selector: selectors.BaseSelector) -> None:
        """Close what the pool holds of ``worker`` (holds _lock; see `_io_failed`)."""
        if worker.holds_place:
            worker.holds_place = False
            self._places_to_return += 1
        worker.close(selector)
        worker.outbuf.clear()
        worker.assigned.clear()

    def _apply_io_changes(self, selector: selectors.BaseSelector) -> None:
        for worker in self._io_changes:
            if worker.sock_done:
                continue
            events = selectors.EVENT_READ
            if worker.outbuf:
                events |= selectors.EVENT_WRITE
            if not worker.registered:
                worker.registered = True
                selector.register(worker.sock, events, worker)
                selector.register(worker.status_fd, selectors.EVENT_READ, worker)
            elif worker.writing != bool(worker.outbuf):
                selector.modify(worker.sock, events, worker)
            worker.writing = bool(worker.outbuf)
        self._io_changes.clear()

    def _flush(self, worker: _Worker, selector: selectors.BaseSelector) -> None:
        with self._lock:
            outbuf = worker.outbuf
            while outbuf:
                try:
                    sent = worker.sock.send(outbuf[0])
                except BlockingIOError:
                    return
                except OSError:
                    outbuf.clear()
                    break
                if sent < len(outbuf[0]):
                    outbuf[0] = outbuf[0][sent:]
                    return
                outbuf.popleft()
            if worker.writing and not worker.sock_done:
                worker.writing = False
                selector.modify(worker.sock, selectors.EVENT_READ, worker)

    def _receive(
        self,
        worker: _Worker,
        messages: list[tuple[_Worker, Message]],
        selector: selectors.BaseSelector,
        final: bool = False,
    ) -> None:
        """Read what ``worker`` sent; with ``final`` (it has exited), all of it."""
        if worker.sock_done:
            return
        received: list[Message] = []
        open_ = worker.reader.read(worker.sock, received, drain=final)
        messages.extend((worker, message) for message in received)
        if not open_ or final:
            self._close_socket(worker, selector)

    def _close_socket(self, worker: _Worker, selector: selectors.BaseSelector) -> None:
        with self._lock:
            worker.sock_done = True
            worker.outbuf.clear()
            if worker.registered:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(worker.sock)
            worker.sock.close()

    def _read_status(self, worker: _Worker, selector: selectors.BaseSelector) -> bool:
        """Read ``worker``'s exit status from the fork server; True once it is known."""
        try:
            data = os.read(worker.status_fd, STATUS.size)
        except BlockingIOError:
            return False
        if len(data) == STATUS.size:
            worker.status = STATUS.unpack(data)[0]
        selector.unregister(worker.status_fd)
        os.close(worker.status_fd)
        worker.status_done = True
        return True

    def _check_workers(self) -> float | None:
        """(I/O loop, holds _lock) End the workers whose task ran past its
        deadline, retire those idle past ``idle_timeout``; returns seconds
        until the next of these is due (None: none)."""
        now = time.monotonic()
        due: float | None = None
        idle_timeout = self._idle_timeout
        for worker in self._workers.values():
            if worker.dying is not None:
                continue
            if worker.deadline is not None:
                deadline, task_id, timeout = worker.deadline
                if deadline <= now:
                    if not self._answer_arriving(worker):
                        self._end_worker(worker, DEADLINE, task_id, timeout)
                    # (else: the answer is read first, which clears the deadline)
                    continue
            else:
                if idle_timeout is None or worker.assigned or worker.leaving is not None:
                    continue
                deadline = worker.idle_since + idle_timeout
                if deadline <= now:
                    self._retire(worker, IDLE)
                    continue
            if due is None or deadline - now < due:
                due = deadline - now
        return due

    @staticmethod
    def _answer_arriving(worker: _Worker) -> bool:
        """Has ``worker`` begun sending something the I/O loop has not read yet?"""
        if worker.reader.partial:
            return True  # (a large result, read in parts: its task has finished)
        if worker.sock_done:
            return False
        try:
            return bool(worker.sock.recv(1, socket.MSG_PEEK))
        except OSError:  # (nothing to read: BlockingIOError; or gone)
            return False

    def _end_worker(self, worker: _Worker, reason: int, task_id: int, detail: float) -> None:
        """(Holds _lock) Kill ``worker`` for a limit: its task ``task_id`` (0: none)
        fails by ``reason`` (``DEADLINE``: ``detail`` is the timeout; ``MEMORY``:
        the size reached)."""
        worker.dying = (reason, task_id, detail)
        worker.deadline = None
        _process.kill_worker(worker.pid)

    def _memory_check_due(self, timeout: float | None) -> tuple[list[_Worker] | None, float | None]:
        """(Holds _lock) The workers to measure against ``kill_worker_memory`` now
        (None: not due), and the I/O loop's wait for the pool: ``timeout``, or less if the
        next check comes first."""
        if self._kill_memory is None:
            return None, timeout
        now = time.monotonic()
        watched = None
        if now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_INTERVAL
            watched = [worker for worker in self._workers.values() if worker.dying is None]
        wait = self._next_memory_check - now
        return watched, wait if timeout is None else min(timeout, wait)

    def _check_memory(self, workers: list[_Worker]) -> None:
        """End the ``workers`` above ``kill_worker_memory`` (read without the lock:
        /proc is quick, but the lock is for quicker things)."""
        limit = self._kill_memory
        assert limit is not None
        over = [
            (worker, size)
            for worker in workers
            if (size := resident_memory(worker.pid)) is not None and size > limit
        ]
        if over:
            with self._lock:
                for worker, size in over:
                    if worker.dying is None and not worker.ended and worker.pid in self._workers:
                        running = worker.assigned[0].task_id if worker.assigned else 0
                        self._end_worker(worker, MEMORY, running, size)

    def _handle(self, messages: list[tuple[_Worker, Message]], ended: list[_Worker]) -> None:
        """Settle the tasks that finished, and deal with the workers that ended."""
        results: list[tuple[_TaskFuture, bool, bytes | bytearray]] = []
        failures: list[tuple[_TaskFuture, bool | None, Any]] = []
        budget_changed = False
        done: list[tuple[_TaskFuture, bool | None, Any]] = []
        try:
            budget_changed = self._take_messages(messages, ended, results, failures)
        finally:
            # (Whatever happened: the tasks taken out of _outstanding settle.)
            done = [(future, *load_outcome(ok, body)) for future, ok, body in results]
            done.extend(failures)
            try:
                if self._places_to_return:
                    self._return_places()
            finally:
                if done:
                    self._finish_tasks(done, worker_ended=bool(ended))
        if ended:
            self._emit_worker_events()
        if budget_changed and not done:
            assert self._budget is not None
            self._budget.changed(self, went_idle=False, worker_ended=True)

    def _take_messages(
        self,
        messages: list[tuple[_Worker, Message]],
        ended: list[_Worker],
        results: list[tuple[_TaskFuture, bool, bytes | bytearray]],
        failures: list[tuple[_TaskFuture, bool | None, Any]],
    ) -> bool:
        """(For `_handle`) take finished tasks out of the pool's books, into ``results``
        and ``failures``; returns True if the worker budget should look again."""
        with self._lock:
            now = time.monotonic()
            for worker, (kind, reason, task_id, value, body) in messages:
                if kind in (RESULT, ERROR):
                    assigned = worker.assigned
                    future = None
                    if assigned and assigned[0].task_id == task_id:
                        future = assigned.popleft()
                    else:
                        for candidate in assigned:
                            if candidate.task_id == task_id:
                                future = candidate
                                assigned.remove(candidate)
                                break
                    worker.finished_tasks += 1
                    self._fruitless = 0
                    if worker.deadline is not None and worker.deadline[1] == task_id:
                        worker.deadline = None
                    if future is not None:
                        self._estimates.observe(future.kind, value)
                    if not assigned:
                        worker.idle_since = now
                    if future is not None and self._outstanding.pop(task_id, None) is not None:
                        future.run_time = value
                        results.append((future, kind == RESULT, body))
                elif kind == LEAVING:
                    worker.leaving = reason
                elif kind == STARTED:
                    # (Measured from when the pool hears of it: never early.)
                    worker.deadline = (now + value, task_id, value)
                elif kind == READY:
                    worker.ready = True
                elif kind == INIT_FAILED:
                    worker.init_failed = (reason, body.decode("utf-8", "replace"))
            for worker in ended:
                self._worker_ended(worker, failures)
            self._dispatch()
            if self._shut_down and not self._outstanding:
                self._retire_all()
            failures.extend(self._undelivered)
            self._undelivered.clear()
            return bool(ended) and self._budget is not None

    def _worker_ended(
        self, worker: _Worker, failures: list[tuple[_TaskFuture, bool | None, Any]]
    ) -> None:
        """``worker`` has exited (holds _lock): fail what died with it, queue the rest."""
        self._workers.pop(worker.pid, None)
        if worker.holds_place:
            worker.holds_place = False
            self._places_to_return += 1
        if not worker.sock_done:
            worker.sock_done = True
            worker.sock.close()
        tasks = [f for f in worker.assigned if not f.done() and not f._dropped]
        worker.assigned.clear()
        killed_for = self._kills.pop(worker.pid, None)
        pid, exitcode = worker.pid, worker.status

        def fail(future: _TaskFuture, error: BaseException) -> None:
            if self._outstanding.pop(future.task_id, None) is not None:
                failures.append((future, False, error))

        if self._terminating:
            for future in tasks:
                fail(
                    future,
                    PoolTerminatedError("the pool was terminated while this task was running"),
                )
            return
        if worker.init_failed is not None:
            step, text = worker.init_failed
            self._fruitless += 1
            why = "initializer failed" if step == INITIALIZER else "setup failed"
            self._worker_events.append(("worker_lost", pid, why))
            self._requeue(tasks)
            if self._fruitless >= MAX_ATTEMPTS:
                count = self._fruitless
                what = (
                    f"the pool's initializer failed in {count} worker processes in a row"
                    if step == INITIALIZER
                    else f"{count} worker processes in a row could not set themselves up (the "
                    "working directory, the environment, or unpickling the initializer and "
                    "initargs)"
                )
                self._fail_queued(
                    WorkerPoolBrokenError(
                        f"{what}; the task was not run. The last failure, in the worker:\n{text}"
                    ),
                    failures,
                )
            return
        if worker.dying is None and worker.leaving is not None and exitcode in (0, None):
            # A clean exit: nothing it held had started.
            self._requeue(tasks)
            reason = EXIT_REASONS.get(worker.leaving)
            if reason is not None:
                self._exit_reasons[pid] = reason
                while len(self._exit_reasons) > 1000:  # nobody asks: forget the oldest
                    del self._exit_reasons[next(iter(self._exit_reasons))]
            return
        # Lost: the task it was running dies with it.
        culprit = None
        reason_code, detail = 0, 0.0
        if worker.dying is not None:
            reason_code, dying_task, detail = worker.dying
            culprit = next((f for f in tasks if f.task_id == dying_task), None)
        elif killed_for is not None:
            culprit = next((f for f in tasks if f.task_id == killed_for), None)
        elif tasks and worker.leaving is None and worker.ready:
            culprit = tasks[0]
        killed = culprit is not None and killed_for == culprit.task_id
        if culprit is not None:
            tasks.remove(culprit)
            fail(culprit, self._lost_error(culprit, pid, exitcode, killed, reason_code, detail))
        why = (
            "kill_task"
            if killed
            else "task_timeout"
            if reason_code == DEADLINE
            else "kill_worker_memory"
            if reason_code == MEMORY
            else describe_exit(exitcode)
        )
        self._worker_events.append(("worker_lost", pid, why))
        if worker.finished_tasks == 0 and culprit is None:
            self._fruitless += 1
        self._requeue(tasks)
        if self._fruitless >= MAX_ATTEMPTS and self._pending:
            self._fail_queued(
                WorkerPoolBrokenError(
                    f"the pool's workers died {self._fruitless} times in a row before running "
                    "any task (killed as they start?); the task was not run"
                ),
                failures,
            )

    def _requeue(self, tasks: list[_TaskFuture]) -> None:
        """Put tasks sent to a worker that left back at the front of the queue."""
        self._pending.extendleft(reversed(tasks))

    def _fail_queued(
        self, error: BaseException, failures: list[tuple[_TaskFuture, bool | None, Any]]
    ) -> None:
        self._fruitless = 0
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future._dropped and self._outstanding.pop(future.task_id, None) is not None:
                if not future._dispatched:
                    future._dispatched = future.set_running_or_notify_cancel()
                    if not future._dispatched:
                        continue
                failures.append((future, False, error))

    def _lost_error(
        self,
        future: _TaskFuture,
        pid: int,
        exitcode: int | None,
        killed: bool,
        reason: int,
        detail: float,
    ) -> BaseException:
        """The error for a task that died with its worker, by how the worker died."""
        if killed:
            return TaskKilledError.for_worker(pid, exitcode)
        if reason == DEADLINE:
            timeout = detail
            return TaskTimeoutError(
                f"the task ran past its {timeout:g}s deadline; its worker process {pid} was "
                "ended and replaced",
                pid=pid,
                timeout=timeout,
            )
        if reason == MEMORY:
            limit = self._kill_memory or 0
            return WorkerMemoryError(
                f"worker process {pid} reached {_megabytes(detail)} of memory, above "
                f"kill_worker_memory={_megabytes(limit)}, while running this task; it was "
                "ended and replaced",
                pid=pid,
                limit=limit,
                size=int(detail),
            )
        return WorkerLostError.for_worker(pid, exitcode)

    def _finish_tasks(
        self, done: list[tuple[_TaskFuture, bool | None, Any]], worker_ended: bool = False
    ) -> None:
        """Count finished tasks, then settle their futures (``ok`` None: cancelled).

        ``worker_ended``: a worker also exited (its place in the budget is free).

        Each has already left ``_outstanding``: a waiter woken by its future
        sees the pool without it.
        """
        with self._lock:
            counts = self._counts
            for _, ok, _ in done:
                counts[_CANCELLED if ok is None else _COMPLETED if ok else _FAILED] += 1
            if self._max_pending is not None:
                self._not_full.notify_all()
            budget = self._budget
            went_idle = not self._outstanding
            callbacks: list[Callable[[], object]] = []
            if went_idle:
                _busy_pools.discard(self)
                self._drained.notify_all()
                callbacks = list(self._idle_callbacks)
                if self._shut_down:
                    self._retire_all()
        # The futures settle whatever happens before: they are counted as
        # finished, and a waiter on one must not wait forever.
        remaining = iter(done)
        if _threads.on_service_thread():
            self._finish_quietly(remaining, budget, went_idle, worker_ended, callbacks)
            return
        try:
            # A pool may wait for a worker (maybe this one's), or this pool's
            # workers may now be free for a pool that could use more.
            if budget is not None:
                budget.changed(self, went_idle=went_idle, worker_ended=worker_ended)
            # (Before the futures settle: a manager's idle clock starts before
            # a waiter on the last future wakes.)
            for callback in callbacks:
                _threads.call_guarded(callback, failed="an idle callback failed")
            for future, ok, value in remaining:
                self._settle(future, ok, value)
        finally:
            # Only when something above raised (on the caller's thread, a
            # done-callback's BaseException): the other futures still settle.
            for future, ok, value in remaining:
                try:
                    self._settle(future, ok, value)
                except BaseException:
                    logger.exception("settling %r failed", future)

    def _finish_quietly(
        self,
        remaining: Iterator[tuple[_TaskFuture, bool | None, Any]],
        budget: WorkerBudget | None,
        went_idle: bool,
        worker_ended: bool,
        idle_callbacks: list[Callable[[], object]],
    ) -> None:
        """`_finish_tasks` on a service thread (the I/O loop, the starter): the
        futures settle here, and their done-callbacks run on this pool's
        strand of `_threads.CallbackRunner` (user code never runs here)."""
        settled: list[tuple[Future[Any], list[Callable[[Future[Any]], object]]]] = []
        try:
            if budget is not None:
                budget.changed(self, went_idle=went_idle, worker_ended=worker_ended)
            for callback in idle_callbacks:  # (a manager's: quick, never waits)
                _threads.call_guarded(callback, failed="an idle callback failed")
        finally:
            for future, ok, value in remaining:
                try:
                    if ok is None:
                        self._settle(future, ok, value)  # (a cancel: no callback is left)
                    else:
                        callbacks = future._finish_quietly(ok, value)
                        if callbacks:
                            settled.append((future, callbacks))
                except BaseException:
                    logger.exception("settling %r failed", future)
            if settled:
                _threads.get_runner().run(self._strand, lambda: _threads.run_callbacks(settled))

    @staticmethod
    def _settle(future: _TaskFuture, ok: bool | None, value: Any) -> None:
        if ok is None:
            future._payload = None
            Future.cancel(future)
            future.set_running_or_notify_cancel()
        else:
            future._finish(ok, value)

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else "open"
        return (
            f"<{type(self).__name__} {state} workers={self.worker_count}/{self._max_size} "
            f"unfinished={self.unfinished_tasks}>"
        )
