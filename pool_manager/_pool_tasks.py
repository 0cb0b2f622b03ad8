"""A pool's tasks: the future `BaseWorkerPool.submit` returns (`_TaskFuture`).

What every queued pool's future shares (cancel while queued, the flags
``_sent`` and ``_dropped``) is `_queued._QueuedFuture`; backpressure and the
counts are `_queued.QueuedPool`'s.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ._protocol import WithBuffers
from ._queued import _QueuedFuture

if TYPE_CHECKING:
    from .pool import BaseWorkerPool


class _TaskFuture(_QueuedFuture):
    """The future `BaseWorkerPool.submit` returns.

    It settles only after the pool has counted the task as finished. Until
    the task is dispatched to a worker (``_sent``) it can be cancelled; once
    dispatched it is *running*, as a ``ProcessPoolExecutor`` task in its
    call queue. Its done-callbacks run on the pool's strand of the callback
    threads, which they cannot end (`_threads.GuardedCallbacksFuture`). It
    holds its pool until it settles, then weakly: finished futures kept by a
    caller do not keep a dropped pool (and its workers) alive.
    """

    def __init__(
        self,
        pool: BaseWorkerPool,
        task_id: int,
        payload: bytes | WithBuffers,
        timeout: float | None,
    ) -> None:
        super().__init__(pool)
        self._pool_ref = weakref.ref(pool)
        self.task_id = task_id
        self._timeout = timeout
        # Kept until settled, to send again; with large buffers, it holds
        # their shared-memory segments (``_buffers.Segment``), which close
        # when the last unfinished task holding them lets go.
        self._payload: bytes | WithBuffers | None = payload
        # (_sent: set_running_or_notify_cancel() was called; _dropped: also
        # abandoned by kill_task.)
        #: The worker's run time of the task, in seconds, once it has run.
        self.run_time: float | None = None
        #: What kind of task it is, for the pool's estimate of its run time.
        self.kind: object = None
        #: A task with a deadline: the pickled results its worker reported
        #: as it went (a ``map`` chunk's calls, one each: see
        #: ``_worker.run_chunk``), in order; None: no deadline, no reports.
        #: The I/O loop appends to it (under the pool's lock) until the task
        #: settles; ``map`` reads it after (the future's settling orders the two).
        self.reports: list[bytes | bytearray] | None = None if timeout is None else []
        #: A report was read after the pool had decided to end the worker
        #: past its deadline (which it decides only with nothing unread
        #: from it): the call that ran out the deadline had finished, and
        #: the next one had only just started.
        self.reported_late = False
        #: It failed because its worker died or was ended while running it
        #: (``_pool_io._lost_error``), not by an error of its own.
        self.lost_with_worker = False

    def _let_go(self) -> None:
        self._payload = None

    def _finish(self, ok: bool, value: Any) -> None:
        self._payload = None
        self._pool = None
        super()._finish(ok, value)

    def _finish_quietly(self, ok: bool, value: Any) -> list[Callable[[Future[Any]], object]]:
        """`_finish` without running the done-callbacks: returns them (see `_finish_tasks`)."""
        self._payload = None
        self._pool = None
        return self.settle_quietly(ok, value)
