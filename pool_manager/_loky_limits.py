"""The loky pool's limits (``loky.py`` is the pool; `_LokyLimits` is its mixin):
per-task deadlines (``task_timeout``, `submit_with_timeout`), `kill_task`, and
the hard memory limit, enforced from outside the worker by the watch's
thread (``_loky_watch.py``), which calls `_LokyLimits._watch`.

Each ends only its slot: `_end_slot` fails the running task and ends the
slot's worker. A task with a deadline, and every task under
``kill_worker_memory``, runs alone in its slot (`_alone`), so nothing else
waits behind it there.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ._durations import Duration, to_seconds
from ._loky_slots import _Actions, _LokyTaskFuture, _Slot
from .errors import TaskKilledError, TaskTimeoutError, WorkerLostError, WorkerMemoryError
from .memory import resident_memory

__all__ = ["MEMORY_CHECK_INTERVAL"]

T = TypeVar("T")

#: Seconds between two checks of the busy workers against ``kill_worker_memory``.
MEMORY_CHECK_INTERVAL = 0.05


class _LokyLimits:
    """`LokyWorkerPool`'s limits (a mixin: the pool's state it uses is declared
    here for the type checker, made and described in `LokyWorkerPool.__init__`)."""

    _lock: threading.Lock
    _slots: list[_Slot]
    _outstanding: set[_LokyTaskFuture]
    _pending: deque[_LokyTaskFuture]
    _waiting: int
    _task_timeout: float | None
    _idle_timeout: float | None
    _hard_memory: int | None
    _next_memory_check: float

    if TYPE_CHECKING:

        def _submit(
            self,
            deadline: float | None,
            fn: Callable[..., T],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            timeout: float | None | object = ...,
        ) -> Future[T]: ...

        def _plan(self, actions: _Actions) -> None: ...

        def _act(self, actions: _Actions, here: bool = False) -> None: ...

        def _requeue(self, futures: list[_LokyTaskFuture]) -> None: ...

        def _close_slot(self, slot: _Slot, actions: _Actions, kill: bool) -> None: ...

        def _conclude(
            self, outcomes: list[tuple[_LokyTaskFuture, bool | None, Any]], actions: _Actions
        ) -> None: ...

    @property
    def task_timeout(self) -> float | None:
        """Seconds a task may run (None: no limit)."""
        return self._task_timeout

    def submit_with_timeout(
        self, timeout: Duration | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> Future[T]:
        """`submit` with a deadline: ``timeout`` seconds once the task starts.

        A task still running then has its slot's worker ended; its future
        fails with `TaskTimeoutError` and the pool's other tasks are
        unaffected. ``None`` means no deadline (the pool's ``task_timeout``
        is not used).
        """
        seconds = to_seconds("timeout", timeout, allow_none=True)
        return self._submit(None, fn, args, kwargs, timeout=seconds)

    def kill_task(self, future: Future[Any]) -> bool:
        """Stop a task now: cancel it if it is still queued, else end its slot's worker.

        Ending the worker fails that task with `TaskKilledError`; the pool
        starts a new slot as needed and its other slots are unaffected. A
        task waiting behind it in the same slot had been sent to loky and
        may have started: it fails with `WorkerLostError`, never run twice.
        A task waiting behind another one in its slot fails at once with
        `TaskKilledError` (it may still run there; its result is dropped).
        Returns False if the task had already finished.

        Raises:
            ValueError: ``future`` did not come from this pool's ``submit``.
        """
        owner = getattr(future, "_pool", None)
        if not isinstance(future, _LokyTaskFuture) or (owner is not None and owner is not self):
            raise ValueError("kill_task takes a future returned by this pool's submit()")
        if future.cancel():
            return True
        actions = _Actions()
        with self._lock:
            if future.done() or future not in self._outstanding:
                return False
            slot = next((slot for slot in self._slots if future in slot.handed), None)
            if slot is None:  # (handed back to the queue: it never started)
                future._dropped = True
                self._waiting -= 1
                error: BaseException | None = TaskKilledError(
                    "pool.kill_task stopped this task before it started", pid=None
                )
            elif slot.handed[0] is future:
                error = TaskKilledError(
                    f"pool.kill_task ended loky worker process {slot.pid}, which was running "
                    "this task; the pool replaced it",
                    pid=slot.pid,
                )
                self._end_slot(slot, error, actions)
                self._plan(actions)
                error = None  # (settled by _end_slot)
            else:  # (behind another task: in loky's queue, where it cannot be taken back)
                error = TaskKilledError(
                    "the task was killed before it started; it may still run once in a "
                    "worker, and that result is dropped",
                    pid=slot.pid,
                )
            if error is not None:
                self._conclude([(future, False, error)], actions)
        self._act(actions)
        return True

    def _alone(self, future: _LokyTaskFuture) -> bool:
        """(Holds _lock) Must ``future`` run alone in its slot? A task with a deadline,
        or any under ``kill_worker_memory``: ending its worker then ends nothing else."""
        return future.timeout is not None or self._hard_memory is not None

    def _end_slot(self, slot: _Slot, error: BaseException, actions: _Actions) -> None:
        """(Holds _lock) End ``slot``'s worker for its running task, which fails with
        ``error`` (a deadline, a memory limit, `kill_task`).

        A task handed to it but not yet sent to loky goes back to the queue;
        one already sent had not started, unless the running task finished
        in the moment before: it fails with `WorkerLostError` (may have
        started), so that no task runs twice. (Tasks with a deadline, and
        every task under ``kill_worker_memory``, run alone: none is behind.)
        """
        culprit = slot.handed.popleft()
        rest = list(slot.handed)
        unsent = set(slot.unsent)
        slot.handed.clear()
        slot.unsent.clear()
        self._requeue([future for future in rest if future in unsent])
        outcomes: list[tuple[_LokyTaskFuture, bool | None, Any]] = [(culprit, False, error)]
        for future in rest:
            if future not in unsent:
                lost = WorkerLostError(
                    f"the pool ended loky worker process {slot.pid} for the task before this "
                    f"one ({type(error).__name__}); this one had been sent to it and may have "
                    "started, so it is not run again",
                    pid=slot.pid,
                )
                lost.__cause__ = error
                outcomes.append((future, False, lost))
        self._conclude(outcomes, actions)
        self._close_slot(slot, actions, kill=True)

    def _watch(self) -> float | None:
        """(The watch's thread, `_loky_watch`) End the slots whose running task is past
        its deadline, or whose worker is past ``kill_worker_memory``, and shut down
        those idle past ``idle_timeout``; returns the seconds until the next
        check is due, None if there is nothing to watch."""
        now = time.monotonic()
        actions = _Actions()
        wait = math.inf
        measure: list[tuple[_Slot, _LokyTaskFuture, int]] = []
        with self._lock:
            for slot in list(self._slots):
                if not slot.handed:
                    if slot.idle_since is not None and self._idle_timeout is not None:
                        due = slot.idle_since + self._idle_timeout
                        if now < due:
                            wait = min(wait, due - now)
                        elif not slot.retiring:
                            self._close_slot(slot, actions, kill=False)  # (idle too long)
                    continue
                running = slot.handed[0]
                if running._deadline is not None:
                    if now < running._deadline:
                        wait = min(wait, running._deadline - now)
                        continue
                    timeout = running.timeout or 0.0
                    self._end_slot(slot, _timed_out(timeout, slot.pid), actions)
            busy = [slot for slot in self._slots if slot.handed and slot.pid is not None]
            if self._hard_memory is not None and busy:
                if now >= self._next_memory_check:
                    self._next_memory_check = now + MEMORY_CHECK_INTERVAL
                    measure = [(slot, slot.handed[0], slot.pid) for slot in busy]  # type: ignore[misc]
                wait = min(wait, self._next_memory_check - now)
            self._plan(actions)
        self._act(actions)
        limit = self._hard_memory
        over = [
            (slot, running, pid, size)
            for slot, running, pid in measure
            if (size := resident_memory(pid)) is not None and limit is not None and size > limit
        ]
        if over:
            assert limit is not None
            actions = _Actions()
            with self._lock:
                for slot, running, pid, size in over:
                    if not slot.closed and slot.handed and slot.handed[0] is running:
                        self._end_slot(slot, _over_memory(pid, limit, size), actions)
                self._plan(actions)
            self._act(actions)
        return None if wait == math.inf else wait


def _timed_out(timeout: float, pid: int | None) -> TaskTimeoutError:
    return TaskTimeoutError(
        f"the task ran past its {timeout:g}s deadline; its loky worker process {pid} was "
        "ended and replaced",
        pid=pid or 0,
        timeout=timeout,
    )


def _over_memory(pid: int, limit: int, size: int) -> WorkerMemoryError:
    return WorkerMemoryError(
        f"loky worker process {pid} reached {size / 1e6:.0f} MB of memory, above "
        f"kill_worker_memory={limit / 1e6:.0f} MB, while running this task; it was ended "
        "and replaced",
        pid=pid,
        limit=limit,
        size=size,
    )
