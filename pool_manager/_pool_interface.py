"""What every pool is: `WorkerPool`, what a `WorkerPoolManager` needs of a
pool on top of ``Executor`` (`BaseWorkerPool` in ``pool.py`` and the Dask
pool implement it, both through `QueuedPool`, ``_queued.py``), and
`TaskCounts`, what a pool counts of its tasks.

`TakenOnAThread` hands what a thread took (a submission, a lease) to a
coroutine, or undoes it if the coroutine was cancelled: `WorkerPool.run`
and `WorkerPoolManager.lease_async` use it.

``pool.py`` re-exports these names: ``from pool_manager.pool import
WorkerPool`` is how the rest of the package and its users reach them.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypedDict, TypeVar

from ._map_methods import MapMethods

__all__ = ["TakenOnAThread", "TaskCounts", "WorkerPool"]

T = TypeVar("T")
V = TypeVar("V")
P = ParamSpec("P")


class WorkerPool(MapMethods, abc.ABC):
    """What a `WorkerPoolManager` needs of a pool, on top of ``Executor``.

    Factories return instances of this class; in practice a subclass of
    `BaseWorkerPool`. Everything here is safe to call from any thread. The
    map methods (``map``, ``imap``, ``imap_unordered``, ``starmap``,
    ``starmap_unordered``) are `MapMethods`'.
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
        `BaseWorkerPool` and the Dask pool (`QueuedPool`) count them all.
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


class TaskCounts(TypedDict):
    """A pool's tasks, counted since it was built."""

    submitted: int  #: accepted by submit (or map)
    running: int  #: in a worker now
    queued: int  #: accepted, not started
    completed: int  #: finished with a result
    failed: int  #: finished with an exception (the task's own, or a lost worker)
    cancelled: int
