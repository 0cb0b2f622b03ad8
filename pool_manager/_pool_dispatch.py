"""A pool's dispatch and its books: `_Dispatch`, a mixin of `BaseWorkerPool`.

Under the pool's lock, and never blocking, it hands queued tasks to workers
in batches (`_dispatch`), asking the starter for workers as the pool is
allowed more (``_pool_start.py``); it sends without blocking (what does not
fit, the I/O loop sends) and tells workers to leave. It is the pool's side
of the caps across keys: the worker budget (``budget.py``) and the busy
places under ``max_busy_workers`` (`BusySlots`). And every task leaves the
pool's books through `_finish_tasks`: counted, then its future settled, its
done-callbacks run off the service threads.
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import _process, _threads
from ._buffers import MAX_DESCRIPTORS, PASSING_ERRORS, Carrying, Segment, descriptors_message
from ._dispatch import RunTimes, batch_size
from ._io_loop import get_loop
from ._places import grant_places
from ._pool_registry import _busy_pools
from ._protocol import BUDGET, EXIT, SETUP, SHUTDOWN, TASKS, TASKS_META, TO_WORKER, WithBuffers
from ._queued import _SUBMITTED
from ._worker import WorkerLimits
from .budget import BudgetReport

if TYPE_CHECKING:
    from ._pool_io import _Worker
    from ._pool_start import _Start
    from ._pool_tasks import _TaskFuture
    from ._queued import _QueuedFuture
    from .budget import BusySlots, WorkerBudget

logger = logging.getLogger("pool_manager")


class _Message:
    """A ``TASKS`` message being made: its tasks' entries, payloads, and the
    segments of their large buffers (each once)."""

    __slots__ = ("blank", "futures", "indices", "meta", "payloads", "segments")

    def __init__(self, blank: Segment | None = None) -> None:
        #: a spare segment for the worker's results (sent last; see TASKS_META)
        self.blank = blank
        self.meta: list[tuple[int, float | None, int, tuple[int, ...]]] = []
        self.payloads: list[bytes] = []
        self.futures: list[_TaskFuture] = []
        self.segments: list[Segment] = []
        self.indices: dict[int, int] = {}  # id(segment) -> its place in segments

    def add(self, future: _TaskFuture, payload: WithBuffers) -> None:
        places = []
        for segment in payload.buffers:
            place = self.indices.get(id(segment))
            if place is None:
                place = self.indices[id(segment)] = len(self.segments)
                self.segments.append(segment)
            places.append(~place if segment.copied else place)  # (see TASKS_META)
        self.meta.append((future.task_id, future._timeout, len(payload.data), tuple(places)))
        self.payloads.append(payload.data)
        self.futures.append(future)


class _Dispatch:
    """`BaseWorkerPool`'s dispatch, its side of the caps across keys, and the
    end of every task (`_finish_tasks`)."""

    # The pool's state it uses, declared for the type checker (made and described
    # in `BaseWorkerPool.__init__` and `QueuedPool.__init__`; what changes, under _lock).
    _lock: threading.Lock
    _blocked_submits: int
    _drained: threading.Condition
    _outstanding: dict[int, _TaskFuture]
    _pending: deque[_TaskFuture]
    _workers: dict[int, _Worker]
    _estimates: RunTimes
    _terminating: bool
    _counts: list[int]
    _shut_down: bool
    _budget: WorkerBudget | None
    _allowed: int | None
    _busy_slots: BusySlots | None
    _places_to_return: int
    _io_token: int | None
    _io_changes: list[_Worker]
    _starts: deque[_Start]
    _strand: _threads.Strand
    _undelivered: list[tuple[_TaskFuture, bool | None, Any]]
    _limits: WorkerLimits
    last_submit: float

    if TYPE_CHECKING:
        # What it calls on the pool's other parts, where they are defined.

        @property
        def worker_count(self) -> int: ...

        def _check_owner(self) -> None: ...

        def _may_start(self, now: float) -> bool: ...

        def _request_start(self, place: bool) -> _Start | None: ...

        # (QueuedPool's, ``_queued.py``)
        def _grant_at_least_one(self) -> None: ...

        def _count_finished(
            self, outcomes: Iterable[bool | None]
        ) -> list[Callable[[], object]]: ...

        def _run_idle_callbacks(self, callbacks: list[Callable[[], object]]) -> None: ...

        @staticmethod
        def _settle(future: _QueuedFuture, ok: bool | None, value: Any) -> None: ...

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
        with self._lock:
            unfinished = len(self._outstanding)
            # (A pool granted none runs one task at a time: `_grant_at_least_one`.)
            want = self.worker_count or (1 if unfinished else 0)
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

    # -- dispatch (all under _lock) ------------------------------------------

    def _worker_limit(self) -> int:
        self._grant_at_least_one()
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

    def _dispatch_soon(self) -> None:
        """(Holds _lock) `_dispatch` for a caller's submit: now, or, while the I/O
        loop is in a round, in that round (`_io_round`), with the results it
        reads: queued tasks then go in batches, and the caller makes no
        system call that would hand the GIL back and forth with the loop."""
        token = self._io_token
        if token is not None and self._workers and get_loop().in_round():
            get_loop().changed(token)
        else:
            self._dispatch()

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
                if not future._sent:
                    if not future.set_running_or_notify_cancel():
                        continue
                    future._sent = True
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
        grant_places(busy.give_back(self, count))

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
        # A worker that returned large buffers last time: a blank segment for them.
        blank = Segment.spare() if worker.large_results else None
        if blank is None and WithBuffers not in map(type, payloads):  # (most batches)
            meta = pickle.dumps(
                [(f.task_id, f._timeout, len(p), ()) for f, p in zip(batch, payloads)],
                pickle.HIGHEST_PROTOCOL,
            )
            length = TASKS_META.size + len(meta) + sum(len(p) for p in payloads)
            head = TO_WORKER.pack(length, TASKS) + TASKS_META.pack(len(meta), 0, 0) + meta
            self._send(worker, head, *payloads)  # type: ignore[arg-type]
            return
        message = _Message(blank)
        for future in batch:
            payload = future._payload or b""
            if type(payload) is bytes:
                message.meta.append((future.task_id, future._timeout, len(payload), ()))
                message.payloads.append(payload)
                message.futures.append(future)
                continue
            assert isinstance(payload, WithBuffers)
            # (At most MAX_DESCRIPTORS a message: past that, another one.)
            if len(message.segments) + len(payload.buffers) + 1 > MAX_DESCRIPTORS:
                self._send_message(worker, message)
                message = _Message()
            message.add(future, payload)
        self._send_message(worker, message)

    def _send_message(self, worker: _Worker, message: _Message) -> None:
        """One ``TASKS`` message (see `_protocol.TASKS_META`)."""
        if not message.meta:
            return
        pickled = pickle.dumps(message.meta, pickle.HIGHEST_PROTOCOL)
        length = TASKS_META.size + len(pickled) + sum(len(p) for p in message.payloads)
        segments = message.segments
        blanks = 0
        if message.blank is not None:
            segments.append(message.blank)
            blanks = 1
        fd_count = len(segments)
        head = TO_WORKER.pack(length, TASKS) + TASKS_META.pack(len(pickled), fd_count, blanks)
        if not fd_count:
            self._send(worker, head + pickled, *message.payloads)
            return
        try:
            self._send(
                worker,
                head + pickled,
                *message.payloads,
                carrying=(tuple(segments), message.futures),
            )
        except OSError as error:
            self._fail_unsent(worker, message.futures, error)

    def _send(
        self,
        worker: _Worker,
        *parts: bytes,
        carrying: tuple[tuple[Segment, ...], list[_TaskFuture]] | None = None,
    ) -> None:
        """Send without blocking; what does not fit now, the I/O loop sends.

        ``carrying``: segments whose descriptors go with the first byte (kept
        with the first part until it is sent), and the tasks that use them.
        Raises ``OSError`` if the descriptors cannot be passed (nothing sent:
        see `_buffers.PASSING_ERRORS`).
        """
        if worker.sock_done:
            return
        outbuf = worker.outbuf
        if not outbuf:
            try:
                if carrying is not None:
                    fds = [segment.fd for segment in carrying[0]]
                    sent = worker.sock.sendmsg(parts, descriptors_message(fds))
                else:
                    sent = worker.sock.sendmsg(parts)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                if carrying is not None and error.errno in PASSING_ERRORS:
                    raise
                return  # the worker is gone: the I/O loop will see it
            if not sent and carrying is not None:
                outbuf.append(Carrying(memoryview(parts[0]), *carrying, len(parts) - 1))
                outbuf.extend(memoryview(part) for part in parts[1:])
            else:
                for part in parts:
                    if sent >= len(part):
                        sent -= len(part)
                        continue
                    outbuf.append(memoryview(part)[sent:])
                    sent = 0
        else:
            if carrying is not None:
                outbuf.append(Carrying(memoryview(parts[0]), *carrying, len(parts) - 1))
                parts = parts[1:]
            outbuf.extend(memoryview(part) for part in parts)
        if outbuf and not worker.writing:
            self._io_changes.append(worker)
            self._wake()

    def _fail_unsent(self, worker: _Worker, futures: list[_TaskFuture], error: OSError) -> None:
        """(Holds _lock) A message's descriptors could not be passed, and nothing of
        it was sent: its tasks fail (delivered once the lock is released). No
        tasks: it was the worker's ``INIT`` (`_init_unsent`)."""
        if not futures:
            self._init_unsent(worker, error)
            return
        failure = OSError(
            error.errno,
            "the task's large buffers could not be passed to its worker process "
            f"({error.strerror}; with ETOOMANYREFS: more descriptors in flight than "
            "RLIMIT_NOFILE allows); it was not run",
        )
        for future in futures:
            if future in worker.assigned:
                worker.assigned.remove(future)
                worker.sent -= 1
            if self._outstanding.pop(future.task_id, None) is not None:
                self._undelivered.append((future, False, failure))
        if not worker.assigned:
            worker.idle_since = time.monotonic()

    def _init_unsent(self, worker: _Worker, error: OSError) -> None:
        """(Holds _lock) A worker's ``INIT`` could not carry the segments of the
        pool's shared data (nothing was sent): the worker is ended, as one whose
        setup failed (its tasks go back to the queue; after ``MAX_ATTEMPTS`` in
        a row, the queued ones fail: `_pool_io._WorkerIO._worker_ended`)."""
        worker.init_failed = (
            SETUP,
            "the pool's shared data could not be passed to the worker process "
            f"({error.strerror}; with ETOOMANYREFS: more descriptors in flight than "
            "RLIMIT_NOFILE allows)",
        )
        _process.kill_worker(worker.pid)

    def _retire(self, worker: _Worker, reason: int) -> None:
        """Tell ``worker`` to leave once it has run what it holds."""
        if worker.leaving is None:
            worker.leaving = reason
            self._send(worker, TO_WORKER.pack(0, EXIT))

    def _retire_all(self) -> None:
        for worker in list(self._workers.values()):
            self._retire(worker, SHUTDOWN)

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

    def _finish_tasks(
        self, done: list[tuple[_TaskFuture, bool | None, Any]], worker_ended: bool = False
    ) -> None:
        """Count finished tasks, then settle their futures (``ok`` None: cancelled).

        ``worker_ended``: a worker also exited (its place in the budget is free).

        Each has already left ``_outstanding``: a waiter woken by its future
        sees the pool without it.
        """
        with self._lock:
            callbacks = self._count_finished(ok for _, ok, _ in done)
            budget = self._budget
            went_idle = not self._outstanding
            if went_idle:
                _busy_pools.discard(self)
                self._drained.notify_all()
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
            self._run_idle_callbacks(callbacks)
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
            self._run_idle_callbacks(idle_callbacks)  # (a manager's: quick, never waits)
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
