"""How a pool starts its workers: `_WorkerStarts`, a mixin of `BaseWorkerPool`,
served by the process's starter (``_starter.py``).

A worker wanted is asked of the starter under the pool's lock
(`_request_start`, which never waits) and counts as live from then on; the
starter's thread makes the fork-server round trip with no pool lock held
(`_start_one`), then files the worker and sends it its first batch
(`_worker_started`). A start that fails for want of what the system may
soon have again is tried again after a back-off (``START_RETRY_*``,
`_start_retry_due`); when the pool gives up, the queued tasks that no live
worker of the pool can take fail with `WorkerStartError`. The pool's hold
on the fork server is taken here, and let go of (`_drop_server`).

Tests that change ``START_RETRY_WINDOW`` change it here: this module reads
it (``pool.py`` re-exports it, to read).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import _process
from ._io_loop import get_loop
from ._pool_io import _Remains, _Worker
from ._pool_registry import _live_pools
from ._protocol import SHUTDOWN
from ._starter import get_starter
from ._worker import init_message
from .errors import ForkServerError, WorkerStartError

if TYPE_CHECKING:
    from ._buffers import Segment
    from ._native_threads import ThreadLimit
    from ._pool_tasks import _TaskFuture
    from ._shared import SharedData

logger = logging.getLogger("pool_manager")

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


class _WorkerStarts:
    """`BaseWorkerPool`'s worker starts (`_starter.StartClient`): asked for under
    the pool's lock, made on the starter's thread, retried after a back-off."""

    # The pool's state it uses, declared for the type checker (made and described
    # in `BaseWorkerPool.__init__`; what changes, under _lock).
    _lock: threading.Lock
    _io_done: threading.Condition
    _outstanding: dict[int, _TaskFuture]
    _pending: deque[_TaskFuture]
    _workers: dict[int, _Worker]
    _terminating: bool
    _shut_down: bool
    _places_to_return: int
    _remains: _Remains
    _io_token: int | None
    _io_changes: list[_Worker]
    _starts: deque[_Start]
    _start_trouble: _StartTrouble | None
    _undelivered: list[tuple[_TaskFuture, bool | None, Any]]
    _config: bytes
    _env: dict[bytes, bytes] | None
    _threads: ThreadLimit | None
    _shared: SharedData | None

    if TYPE_CHECKING:
        # What it calls on the pool's other parts, where they are defined.

        def _dispatch(self, start: bool = True) -> None: ...

        def _send(
            self,
            worker: _Worker,
            *parts: bytes,
            carrying: tuple[tuple[Segment, ...], list[_TaskFuture]] | None = None,
        ) -> None: ...

        def _init_unsent(self, worker: _Worker, error: OSError) -> None: ...

        def _send_tasks(self, worker: _Worker, batch: list[_TaskFuture]) -> None: ...

        def _retire(self, worker: _Worker, reason: int) -> None: ...

        def _wake(self) -> None: ...

        def _after_unlock(self) -> None: ...

        def _requeue(self, tasks: list[_TaskFuture]) -> None: ...

        def _fail_queued(
            self, error: BaseException, failures: list[tuple[_TaskFuture, bool | None, Any]]
        ) -> None: ...

        # (The I/O loop calls these: `_pool_io._WorkerIO`.)
        def _io_round(self, selector: selectors.BaseSelector) -> float | None: ...

        def _io_events(
            self, events: list[tuple[selectors.SelectorKey, int]], selector: selectors.BaseSelector
        ) -> None: ...

        def _io_failed(self, error: BaseException, selector: selectors.BaseSelector) -> None: ...

        def _io_detached(self) -> None: ...

    def _request_start(self, place: bool) -> _Start | None:
        """(Holds _lock) Ask the starter for a worker (``place``: it holds a place
        under ``max_busy_workers``); it counts as live from now on. None if
        there is no thread to start it or to serve it (a start failure,
        `_start_failed`).

        The pool attaches to the I/O loop here, on the caller's thread, so
        that the loop's thread is started (if it must be) as the task is
        submitted, not later on the starter's: a program may have begun to
        exit by then (Python 3.12 refuses new threads then). It stays
        attached while a start is under way (`_io_round`).
        """
        try:
            if self._io_token is None:
                self._io_token = self._remains.token = get_loop().attach(self, self._remains)
            get_starter().request(self)
        except (OSError, RuntimeError) as error:
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
            # Its first tasks still unfinished (one may have been killed, or
            # failed by an I/O error, while the worker was on its way).
            batch = [f for f in start.batch if f.task_id in self._outstanding]
            if started is None:
                self._places_to_return += place
                self._requeue(batch)
                assert error is not None
                self._start_failed(error)
                # (Its tasks may go to live workers, but no other start is
                # tried now: after a retry's back-off, or the next submit.)
                self._dispatch(start=False)
                if not self._workers and not self._starts:
                    self._wake()  # (the loop's next round detaches the pool)
            else:
                worker = self._add_worker(*started, place)
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
        # (A worker leaving runs no more tasks: its index is free for its successor.)
        taken = {other.index for other in self._workers.values() if other.leaving is None}
        worker.index = next(i for i in itertools.count() if i not in taken)
        self._workers[pid] = worker
        _live_pools.add(self)
        # Made now: the worker gets the directory and environment of its start;
        # the segments of the pool's shared data go with it.
        message = init_message(self._config, self._env, worker.index, self._threads)
        shared = self._shared
        if shared is None or not shared.segments:
            self._send(worker, message)
        else:
            try:
                self._send(worker, message, carrying=(shared.segments, []))
            except OSError as error:  # (_buffers.PASSING_ERRORS: nothing was sent)
                self._init_unsent(worker, error)
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

    def _drop_server(self) -> bool:
        with self._lock:
            if self._workers or self._starts or self._remains.server is None:
                return False
            self._remains.server = None
        _process.release_server()
        return True
