"""The half of a pool that runs on the process's I/O loop (``_io_loop.py``):
`_WorkerIO`, a mixin of `BaseWorkerPool`, and the records it keeps:
`_Worker` (the pool's side of one worker process) and `_Remains` (what a
pool holds outside the Python heap, for its finalizer and the loop).

On the loop, under the pool's lock, it registers new workers' sockets and
status pipes, reads results and settles their tasks (their done-callbacks
run elsewhere: `_pool_dispatch._Dispatch._finish_tasks`), flushes what did
not fit in a socket, learns of worker exits from the fork server's status
pipes, ends workers past a deadline or ``kill_worker_memory``, retires those
idle past ``idle_timeout``, and puts the tasks of a worker that left back in
the queue (or fails them, when workers keep dying before they run one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import _process, _threads
from ._buffers import PASSING_ERRORS, Carrying, descriptors_message
from ._dispatch import RunTimes
from ._io_loop import get_loop
from ._protocol import (
    DEADLINE,
    ERROR,
    EXIT_REASONS,
    IDLE,
    INIT_FAILED,
    INITIALIZER,
    LEAVING,
    MEMORY,
    READY,
    RESULT,
    STARTED,
    STATUS,
    Message,
    MessageReader,
    load_outcome,
)
from .errors import (
    PoolTerminatedError,
    TaskKilledError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
    WorkerPoolBrokenError,
    describe_exit,
)
from .memory import resident_memory

if TYPE_CHECKING:
    from ._pool_tasks import _TaskFuture
    from .budget import BudgetReport, WorkerBudget

logger = logging.getLogger("pool_manager")

#: How many workers in a row may end before finishing a task (a failing
#: initializer, workers killed as they start) before the queued tasks fail.
MAX_ATTEMPTS = 3

#: Seconds between two checks of a pool's workers against ``kill_worker_memory``.
MEMORY_CHECK_INTERVAL = 0.05


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


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
        "index",
        "init_failed",
        "reader",
        "leaving",
        "outbuf",
        "pid",
        "holds_place",
        "large_results",
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
        self.index = 0  # its index in the pool (`_shared.worker_index`), set as it is filed
        self.owner = owner  # its pool's token in the I/O loop
        self.sock = sock
        self.status_fd = status_fd
        self.reader = MessageReader()
        self.outbuf: deque[memoryview | Carrying] = deque()
        #: Tasks sent and not answered, in the order sent (so the first is
        #: the one running).
        self.assigned: deque[_TaskFuture] = deque()
        self.sent = 0
        self.finished_tasks = 0
        #: its last result had large buffers (its next batch takes a blank segment)
        self.large_results = False
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
            self.reader.close()
        if not self.status_done:
            self.status_done = True
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.status_fd)
            with contextlib.suppress(OSError):
                os.close(self.status_fd)


class _WorkerIO:
    """`BaseWorkerPool`'s side of the I/O loop (`_io_loop.LoopClient`): the
    methods the loop calls, and what they do under the pool's lock."""

    # The pool's state it uses, declared for the type checker (made and described
    # in `BaseWorkerPool.__init__`; what changes, under _lock).
    _lock: threading.Lock
    _io_done: threading.Condition
    _outstanding: dict[int, _TaskFuture]
    _pending: deque[_TaskFuture]
    _starts: deque[Any]
    _workers: dict[int, _Worker]
    _kills: dict[int, int]
    _exit_reasons: dict[int, str]
    _fruitless: int
    _estimates: RunTimes
    _terminating: bool
    _shut_down: bool
    _worker_events: list[tuple[str, int, str]]
    _budget: WorkerBudget | None
    _places_to_return: int
    _remains: _Remains
    _io_token: int | None
    _io_changes: list[_Worker]
    _disposal_waits: bool
    _strand: _threads.Strand
    _undelivered: list[tuple[_TaskFuture, bool | None, Any]]
    _idle_timeout: float | None
    _kill_memory: int | None
    _next_memory_check: float
    last_submit: float

    if TYPE_CHECKING:
        # What it calls on the pool's other parts, where they are defined.

        def _dispatch(self, start: bool = True) -> None: ...

        def _retire(self, worker: _Worker, reason: int) -> None: ...

        def _retire_all(self) -> None: ...

        def _return_places(self) -> None: ...

        def _after_unlock(self) -> None: ...

        def _finish_tasks(
            self, done: list[tuple[_TaskFuture, bool | None, Any]], worker_ended: bool = False
        ) -> None: ...

        def _emit_worker_events(self) -> None: ...

        def _worker_setup_failed(self, what: str, traceback: str) -> None: ...

        def _worker_got_ready(self) -> None: ...

        def _fail_unsent(
            self, worker: _Worker, futures: list[_TaskFuture], error: OSError
        ) -> None: ...

        def _deliver_undelivered(self) -> None: ...

        def _drop_server(self) -> bool: ...

        def budget_report(self) -> BudgetReport: ...

        def apply_allowance(self) -> None: ...

    # -- on the I/O loop (_io_loop.py) -------------------------------------------

    def _io_round(self, selector: selectors.BaseSelector) -> float | None:
        """(I/O loop) Register new workers, enforce the limits.

        Returns how long the loop may wait for this pool (``math.inf``: until
        something happens); None once no worker is left: then the pool has
        left the loop (a later worker attaches it again).
        """
        with self._lock:
            self._apply_io_changes(selector)
            if self._pending:
                self._dispatch()  # (what callers left for this round: `_dispatch_soon`)
            if not self._workers and not self._starts:
                self._io_token = self._remains.token = None
                self._io_changes.clear()
                self._io_done.notify_all()
                return None
            timeout = self._check_workers()
            watched, timeout = self._memory_check_due(timeout)
        self._after_unlock()
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
        elif self._undelivered:  # (tasks whose large buffers could not be passed)
            self._deliver_undelivered()

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
                if not future._sent:
                    future._sent = future.set_running_or_notify_cancel()
                    if not future._sent:
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
                part = outbuf[0]
                try:
                    if type(part) is memoryview:
                        sent = worker.sock.send(part)
                    else:  # (Carrying: descriptors go with its first byte)
                        fds = [segment.fd for segment in part.segments]
                        try:
                            sent = worker.sock.sendmsg([part.view], descriptors_message(fds))
                        except OSError as error:
                            if error.errno not in PASSING_ERRORS:
                                raise
                            # Nothing of the message went: drop it, fail its tasks.
                            for _ in range(part.rest + 1):
                                outbuf.popleft()
                            self._fail_unsent(worker, part.futures, error)
                            continue
                        part = outbuf[0] = part.view
                except BlockingIOError:
                    return
                except OSError:
                    outbuf.clear()
                    break
                if sent < len(part):
                    outbuf[0] = part[sent:]
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
            worker.reader.close()

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
        results: list[tuple[_TaskFuture, bool, bytes | bytearray, Any]] = []
        failures: list[tuple[_TaskFuture, bool | None, Any]] = []
        budget_changed = False
        done: list[tuple[_TaskFuture, bool | None, Any]] = []
        try:
            budget_changed = self._take_messages(messages, ended, results, failures)
        finally:
            # (Whatever happened: the tasks taken out of _outstanding settle.)
            done = [
                (future, *load_outcome(ok, body, buffers)) for future, ok, body, buffers in results
            ]
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
        results: list[tuple[_TaskFuture, bool, bytes | bytearray, Any]],
        failures: list[tuple[_TaskFuture, bool | None, Any]],
    ) -> bool:
        """(For `_handle`) take finished tasks out of the pool's books, into ``results``
        and ``failures``; returns True if the worker budget should look again."""
        with self._lock:
            now = time.monotonic()
            for worker, (kind, reason, task_id, value, body, buffers) in messages:
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
                    if kind == RESULT:
                        worker.large_results = reason > 0  # (its segments)
                    self._fruitless = 0
                    if worker.deadline is not None and worker.deadline[1] == task_id:
                        worker.deadline = None
                    if future is not None:
                        self._estimates.observe(future.kind, value)
                    if not assigned:
                        worker.idle_since = now
                    if future is not None and self._outstanding.pop(task_id, None) is not None:
                        future.run_time = value
                        results.append((future, kind == RESULT, body, buffers))
                elif kind == LEAVING:
                    worker.leaving = reason
                elif kind == STARTED:
                    # (Measured from when the pool hears of it: never early.)
                    worker.deadline = (now + value, task_id, value)
                    if body:  # a map chunk's next call: the previous one's result
                        future = self._outstanding.get(task_id)
                        if future is not None and future.reports is not None:
                            future.reports.append(body)
                            # (Only a deadline's kill peeks first: see _answer_arriving.)
                            dying = worker.dying
                            future.reported_late |= dying is not None and dying[0] == DEADLINE
                elif kind == READY:
                    worker.ready = True
                    self._worker_got_ready()
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
            worker.reader.close()
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
            what = "the pool's initializer" if step == INITIALIZER else "the setup before it"
            self._worker_setup_failed(what, text)
            self._worker_events.append(("worker_lost", pid, why))
            self._requeue(tasks)
            if self._fruitless >= MAX_ATTEMPTS:
                count = self._fruitless
                what = (
                    f"the pool's initializer failed in {count} worker processes in a row"
                    if step == INITIALIZER
                    else f"{count} worker processes in a row could not set themselves up (the "
                    "working directory, the environment, unpickling the initializer and "
                    "initargs, or loading the shared data)"
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
        for future in tasks:
            if future.reports:  # (it runs again from its start, and reports again)
                future.reports.clear()
        self._pending.extendleft(reversed(tasks))

    def _fail_queued(
        self, error: BaseException, failures: list[tuple[_TaskFuture, bool | None, Any]]
    ) -> None:
        self._fruitless = 0
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future._dropped and self._outstanding.pop(future.task_id, None) is not None:
                if not future._sent:
                    future._sent = future.set_running_or_notify_cancel()
                    if not future._sent:
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
        future.lost_with_worker = True
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
