"""What every pool that queues tasks shares: `QueuedPool`, the base of
`BaseWorkerPool` (``pool.py``), `DaskWorkerPool` (``dask.py``) and
`LokyWorkerPool` (``loky.py``), and `_QueuedFuture`, the base of their
futures.

The engines accept a task the same way and keep the same books; only how a
task is sent and how its result comes back differ. What is shared lives
here, under the pool's ``_lock``:

- admission (`_admit`): backpressure with ``max_pending`` (`_wait_for_room`:
  ``submit`` waits on ``_not_full`` while ``max(1, worker_count) +
  max_pending`` tasks are unfinished), then the shutdown check; an admitted
  task is counted and queued (`_enqueue`);
- the grant (`worker_count`, `grant_workers`; a pool granted no worker
  still runs one task at a time, `_grant_at_least_one`);
- the counts (`task_counts`; what counts as running is the engine's,
  `_running`), and a task's end in the books (`_count_finished`, then the
  idle callbacks, `_run_idle_callbacks`, once no unfinished work is left);
- cancel while queued (`_cancel`, which `_QueuedFuture.cancel` hands off
  to) and settling a future (`_settle`);
- shutdown: ``shutdown(cancel_futures=True)`` and an engine's ``terminate``
  cancel what is queued (`_cancel_queued`); blocked submits raise
  `PoolShutDownError`, whose message says why when a manager ended the
  pool (`set_shutdown_reason`);
- a worker whose setup or initializer failed: its traceback is logged once
  per run of such failures (`_worker_setup_failed`, `_log_setup_failure`),
  not once per worker; the engine puts it in the error its tasks get.

Each engine keeps its own: its books of unfinished tasks
(``_outstanding``), sending (dispatch), how results come back and what
settles them, ``dispose`` (what it drains and releases) and ``terminate``;
and it tells the base, through the hooks below (``_running``,
``_use_grant``, ``_after_grant``, ``_stop_dispatch``, ``_unqueue``,
``_finish_cancelled``), what differs.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from . import _threads
from ._durations import to_count, wait_step
from ._map import TARGET_CHUNK_SECONDS, MapInput, OpenMaps, chunk_runner, map_lazily
from ._pool_interface import TaskCounts, WorkerPool
from .errors import PoolShutDownError, ResultTimeoutError
from .progress import ProgressOption

__all__ = ["ChunkedTaskPool", "QueuedPool"]

logger = logging.getLogger("pool_manager")

T = TypeVar("T")

#: What a pool shut down by its own ``shutdown`` says (``ProcessPoolExecutor``'s words).
_PLAIN_REFUSAL = "cannot schedule new futures after shutdown"

#: Indices of a pool's ``_counts``.
_SUBMITTED, _COMPLETED, _FAILED, _CANCELLED = range(4)


class _QueuedFuture(_threads.GuardedCallbacksFuture):
    """The base of the futures a `QueuedPool` hands out.

    Until it is sent (to a worker, to the cluster) it waits in the pool's
    queue and can be cancelled; once sent it is *running*, as a
    ``ProcessPoolExecutor`` task in its call queue. Its done-callbacks
    cannot end the thread they run on (`_threads.GuardedCallbacksFuture`).
    """

    def __init__(self, pool: QueuedPool[Any]) -> None:
        super().__init__()
        #: Its pool, until it is cancelled (an engine may let go sooner).
        self._pool: QueuedPool[Any] | None = pool
        self._sent = False  # handed to a worker or the cluster (under the pool's lock)
        self._dropped = False  # cancelled while queued, or abandoned (under the pool's lock)

    def cancel(self) -> bool:
        pool = self._pool
        if pool is None:
            return Future.cancel(self)  # (settled)
        if pool._cancel(self):
            self._pool = None
            return True
        return False

    def _let_go(self) -> None:
        """Drop what it holds only to be sent (it will not be): nothing here."""

    def _finish(self, ok: bool, value: Any) -> None:
        """Settle with a result (``ok``) or an exception."""
        if ok:
            self.set_result(value)
        else:
            self.set_exception(value)


F = TypeVar("F", bound=_QueuedFuture)


class QueuedPool(WorkerPool, Generic[F]):
    """A `WorkerPool` that queues its tasks: admission, backpressure, the
    grant, cancel while queued, the counts, idle callbacks and shutdown.

    Subclasses make their books of unfinished tasks, ``_outstanding`` (any
    sized container), and define the hooks (see the module docstring).
    """

    #: How `__repr__` names `worker_count`.
    _size_label = "workers"
    #: The log line of an idle callback that raised.
    _idle_callback_failed = "an idle callback failed"

    _outstanding: Sized  # the engine's: accepted, not finished (under _lock)

    def __init__(self, max_size: int, max_pending: int | None) -> None:
        self._max_size = max_size
        self._max_pending = max_pending
        # _lock guards everything below, and the engine's books; the conditions share it.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)  # backpressure waiters (submit)
        self._blocked_submits = 0  # submit calls waiting on _not_full
        #: dispose's waiters for the engine's work to drain (see each engine's dispose).
        self._drained = threading.Condition(self._lock)
        self._pending: deque[F] = deque()  # accepted, not sent (some dropped: cancelled)
        self._counts = [0, 0, 0, 0]  # submitted, completed, failed, cancelled
        self._granted: int | None = None  # None: not granted piecemeal, all usable
        self._shut_down = False
        #: What `PoolShutDownError` says once shut down (`set_shutdown_reason`).
        self._refusal = _PLAIN_REFUSAL
        self._idle_callbacks: list[Callable[[], object]] = []
        #: A worker's failed setup to log (what failed, its traceback), and
        #: whether the current run of such failures was logged already.
        self._setup_failure: tuple[str, str] | None = None
        self._setup_failure_logged = False
        self._open_maps = OpenMaps()  # lock-free (see OpenMaps)
        #: Held by dispose while it releases the engine's resources: a second
        #: dispose returns only after the first has.
        self._dispose_lock = threading.Lock()

    # -- hooks (each engine's) ---------------------------------------------

    def _check_owner(self) -> None:
        """Raise if the pool may not be used here (`BaseWorkerPool`: after a fork)."""

    def _inherited(self) -> bool:
        """True where the pool is inert (`BaseWorkerPool`: in a forked child)."""
        return False

    @abc.abstractmethod
    def _running(self) -> int:
        """(Holds _lock) How many unfinished tasks are running (for `task_counts`)."""

    def _use_grant(self) -> None:
        """(Holds _lock) More workers were granted: use them now, if the engine can here."""

    def _after_grant(self) -> None:
        """(No lock held) What a grant leaves to do once the lock is released."""

    def _stop_dispatch(self, terminate: bool) -> None:
        """(Holds _lock) Queued tasks are being cancelled (by `terminate` if ``terminate``)."""

    def _unqueue(self, future: F) -> None:
        """(Holds _lock) ``future``, queued, was cancelled: out of the engine's books."""

    @abc.abstractmethod
    def _finish_cancelled(self, future: F) -> None:
        """(No lock held) Count cancelled ``future`` as finished, then settle it."""

    # -- WorkerPool --------------------------------------------------------

    @property
    def max_size(self) -> int:
        """The most workers (for a Dask pool: tasks on the cluster) it may ever use."""
        return self._max_size

    @property
    def max_pending(self) -> int | None:
        """Tasks that may wait beyond `worker_count` busy ones before ``submit`` blocks.

        ``None``: ``submit`` never blocks.
        """
        return self._max_pending

    @property
    def worker_count(self) -> int:
        """Workers granted so far (for a Dask pool: its cap of tasks on the cluster).

        `max_size` until the first `grant_workers` call; from then on, what
        was granted (a pool granted none may still run one task at a time).
        """
        granted = self._granted
        return self._max_size if granted is None else granted

    def grant_workers(self, count: int) -> int:
        """Grant up to ``count`` more workers, never above `max_size`; returns the grant in all.

        A pool starts with all `max_size` workers usable; its first call
        (the manager makes it for every pool it builds) switches it to
        using only what it was granted. Queued tasks that now fit are sent
        (`BaseWorkerPool` may ask its starter for workers to take them); the
        call itself starts no process.
        """
        self._check_owner()
        to_count("grant_workers: count", count, minimum=0)
        with self._lock:
            self._granted = min(self._max_size, (self._granted or 0) + count)
            if self._max_pending is not None:
                self._not_full.notify_all()  # more workers: more room under backpressure
            self._use_grant()
            granted = self._granted
        self._after_grant()
        return granted

    @property
    def unfinished_tasks(self) -> int:
        """Tasks accepted by ``submit`` whose futures are not done: queued or running."""
        return len(self._outstanding)

    @property
    def unfinished_maps(self) -> int:
        return len(self._open_maps)

    def add_idle_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` each time `unfinished_tasks` drops to zero.

        It runs on whichever thread finished the last task (for a Dask pool,
        usually the Client's event-loop thread): keep it short. What it
        raises is logged and ignored.
        """
        with self._lock:
            self._idle_callbacks.append(callback)

    def task_counts(self) -> TaskCounts:
        """The pool's tasks: submitted, running (sent to a worker or the cluster),
        queued (not sent), completed, failed, cancelled."""
        self._check_owner()
        with self._lock:
            submitted, completed, failed, cancelled = self._counts
            unfinished = len(self._outstanding)
            running = min(self._running(), unfinished)
        return TaskCounts(
            submitted=submitted,
            running=running,
            queued=unfinished - running,
            completed=completed,
            failed=failed,
            cancelled=cancelled,
        )

    @property
    def is_shut_down(self) -> bool:
        """True once `shutdown`, `dispose` or `terminate` was called."""
        return self._shut_down

    def set_shutdown_reason(self, reason: str) -> None:
        """Say why the pool is about to be shut down: `PoolShutDownError`'s message from then on.

        A `WorkerPoolManager` calls it just before it disposes of a pool it
        built (expired, retired, to free memory, or with the manager), so
        that a ``submit`` on the pool, kept past its lease, says which key's
        pool it was, why it went and what to do. A pool already shut down
        keeps what it says: one shut down by its own `shutdown` raises with
        ``ProcessPoolExecutor``'s plain message.
        """
        with self._lock:
            if not self._shut_down:
                self._refusal = reason

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and release what the pool holds (``Executor.shutdown``).

        With ``cancel_futures``, tasks that have not started (still queued)
        are cancelled; those already sent finish. With ``wait``, blocks
        until accepted work is done and the pool's resources (worker
        processes and threads; a Dask pool's executor) are released;
        otherwise returns at once and the work still finishes. Calls
        `dispose`, so a subclass's shared data is released too. Idempotent.
        """
        if self._inherited():
            return  # (the parent's: never shut down from a forked child)
        if cancel_futures:
            self._cancel_queued(terminate=False)
        self.dispose(wait=wait)

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else "open"
        return (
            f"<{type(self).__name__} {state} "
            f"{self._size_label}={self.worker_count}/{self._max_size} "
            f"unfinished={self.unfinished_tasks}>"
        )

    # -- admission (under _lock) -------------------------------------------

    def _capacity(self) -> int:
        """(With ``max_pending``) unfinished tasks at which ``submit`` blocks."""
        assert self._max_pending is not None
        return max(1, self.worker_count) + self._max_pending

    def _map_window(self) -> int | None:
        """How many tasks ``map`` may have unfinished (None: no bound)."""
        return None if self._max_pending is None else max(1, self._capacity())

    def _admit(self, deadline: float | None, block: bool = True) -> bool:
        """(Holds _lock) Make room for one more task; False if there is none and not ``block``.

        Raises:
            PoolShutDownError: the pool is shut down (also while it waited).
            ResultTimeoutError: still full at ``deadline`` (see `_wait_for_room`).
        """
        if self._max_pending is not None and not self._wait_for_room(deadline, block):
            return False
        if self._shut_down:
            raise PoolShutDownError(self._refusal)
        return True

    def _wait_for_room(self, deadline: float | None, block: bool) -> bool:
        """(Holds _lock) Wait until the pool has room for one more task.

        Returns False, without waiting, if there is none and ``block`` is false.
        Never waits on a thread that must not stall (the task is admitted
        beyond ``max_pending``: see `BaseWorkerPool.submit`), nor past
        ``deadline`` (a ``time.monotonic()`` time; then `ResultTimeoutError`).
        Signalled on ``_not_full`` by a task finishing (`_count_finished`), a
        grant and shutdown.
        """
        while not self._shut_down and len(self._outstanding) >= self._capacity():
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
            self._blocked_submits += 1
            try:
                self._not_full.wait(wait_step(left))
            finally:
                self._blocked_submits -= 1
        return True

    def _enqueue(self, future: F) -> None:
        """(Holds _lock) Count an admitted task and queue it (after the engine booked it).

        A pool granted no worker is granted one now (`_grant_at_least_one`):
        what it then asks of the worker budget counts the task.
        """
        self._grant_at_least_one()
        self._counts[_SUBMITTED] += 1
        self._pending.append(future)

    def _grant_at_least_one(self) -> None:
        """(Holds _lock) A pool granted no worker still gets one: it must make progress."""
        if self._granted == 0:
            self._granted = 1

    # -- a worker's failed setup ----------------------------------------------

    def _worker_setup_failed(self, what: str, traceback: str) -> None:
        """(Holds _lock) In a worker, ``what`` (``"the pool's initializer"``) failed with
        ``traceback``: kept for `_log_setup_failure` if it is the first failure
        since the pool was built or a worker last got ready."""
        if not self._setup_failure_logged:
            self._setup_failure_logged = True
            self._setup_failure = (what, traceback)

    def _worker_got_ready(self) -> None:
        """(Holds _lock) A worker's setup and initializer went well: the next
        failure is logged again."""
        self._setup_failure_logged = False

    def _log_setup_failure(self) -> None:
        """(No lock held, never on the I/O loop) Log the failure `_worker_setup_failed`
        kept, if any: once, at ERROR, on the ``"pool_manager"`` logger."""
        with self._lock:
            failure, self._setup_failure = self._setup_failure, None
        if failure is not None:
            what, traceback = failure
            pool = f"the pool {self.name!r}" if self.name is not None else type(self).__name__
            logger.error(
                "%s: in a worker process, %s failed (logged once until a worker gets ready; "
                "the tasks that could not run get this traceback in their error):\n%s",
                pool,
                what,
                traceback.rstrip("\n"),
            )

    # -- the end of a task ---------------------------------------------------

    def _count_finished(self, outcomes: Iterable[bool | None]) -> list[Callable[[], object]]:
        """(Holds _lock) Count finished tasks (``ok`` None: cancelled), each already
        out of ``_outstanding``, and wake blocked submits.

        Returns the idle callbacks to run (`_run_idle_callbacks`, with no
        lock held) when no unfinished task is left, else none.
        """
        counts = self._counts
        for ok in outcomes:
            counts[_CANCELLED if ok is None else _COMPLETED if ok else _FAILED] += 1
        if self._max_pending is not None:
            self._not_full.notify_all()
        return [] if self._outstanding else list(self._idle_callbacks)

    def _run_idle_callbacks(self, callbacks: list[Callable[[], object]]) -> None:
        """Run idle callbacks (no lock held); what one raises is logged and ignored."""
        for callback in callbacks:
            # A listener's bug must not lose a task's result, nor end the thread.
            _threads.call_guarded(callback, failed=self._idle_callback_failed)

    def _cancel(self, future: F) -> bool:
        """(For `_QueuedFuture.cancel`) Cancel ``future`` if it is still queued.

        A task already sent, dropped or done is left to ``Future.cancel``
        (which refuses a running or finished one).
        """
        with self._lock:
            if future._sent or future.done() or future._dropped:
                return Future.cancel(future)
            future._dropped = True  # (dispatch skips it)
            future._let_go()
            self._unqueue(future)
        self._finish_cancelled(future)
        return True

    def _cancel_queued(self, terminate: bool) -> None:
        """Shut down and cancel every queued task (``shutdown(cancel_futures=True)``,
        and `terminate` if ``terminate``); blocked submits raise `PoolShutDownError`."""
        with self._lock:
            self._shut_down = True
            self._stop_dispatch(terminate)
            self._not_full.notify_all()
            pending = list(self._pending)
        for future in pending:
            future.cancel()

    def _close_admission(self) -> None:
        """(Holds _lock) Accept no more tasks; blocked submits raise `PoolShutDownError`."""
        self._shut_down = True
        self._not_full.notify_all()

    @staticmethod
    def _settle(future: _QueuedFuture, ok: bool | None, value: Any) -> None:
        """Settle ``future`` (no lock held): ``ok`` None cancels it."""
        if ok is None:
            future._let_go()
            Future.cancel(future)
            future.set_running_or_notify_cancel()
        else:
            future._finish(ok, value)


class ChunkedTaskPool(QueuedPool[F]):
    """A `QueuedPool` whose map methods send each chunk as one task of its own, run
    by `chunk_runner` (the Dask and loky pools; `BaseWorkerPool` has its own
    ``_map_calls``).

    Subclasses define ``_submit(deadline, fn, args, kwargs)``: ``submit``,
    waiting for room only until ``deadline`` (a ``time.monotonic()`` time).
    """

    #: ``map`` over an input without a length, with no chunk size: chunks are
    #: sized to about this many seconds of calls, as measured.
    _target_chunk_seconds = TARGET_CHUNK_SECONDS

    def _calls_alone(self) -> bool:
        """Must ``map`` send each call as its own task (a deadline per call)? No, here."""
        return False

    @abc.abstractmethod
    def _submit(
        self,
        deadline: float | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Future[Any]:
        """``submit``, waiting for room only until ``deadline``; raises ``TimeoutError`` then."""

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
        """Every map method's engine (see `MapMethods.map`): each chunk a task of
        its own, run by `chunk_runner` (for a Dask pool, one Dask task), lazy
        where it must be (unlike Dask's ``Client.map``); measured chunks hold
        about the engine's ``_target_chunk_seconds`` of calls. A task that
        failed as a whole yields its error, with ``return_exceptions``, for
        every call of its chunk (run with ``chunksize=1`` to lose only the
        call)."""
        runner = chunk_runner(fn, starred=inputs.starred, catch=return_exceptions)
        submit = self._submit
        if self._calls_alone():
            chunksize = 1
        return map_lazily(
            fn,
            inputs,
            submit=lambda deadline, call, args: submit(deadline, call, args, {}),
            submit_chunk=lambda deadline, chunk: submit(deadline, runner, (chunk,), {}),
            timeout=timeout,
            chunksize=chunksize,
            workers=max(1, self.worker_count),
            window=self._map_window(),
            progress=progress,
            name=self.name,
            ordered=ordered,
            target_chunk_seconds=self._target_chunk_seconds,
            open_maps=self._open_maps,
            return_exceptions=return_exceptions,
        )
