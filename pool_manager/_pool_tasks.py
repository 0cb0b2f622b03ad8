"""A pool's tasks: the future `BaseWorkerPool.submit` returns (`_TaskFuture`),
the indices of a pool's counts, and backpressure (`wait_for_room`, which the
Dask pool shares; it imports it from ``pool.py``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sized
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from . import _threads
from ._durations import wait_step
from .errors import ResultTimeoutError

if TYPE_CHECKING:
    from .pool import BaseWorkerPool

_SUBMITTED, _COMPLETED, _FAILED, _CANCELLED = range(4)


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
