"""The loky pool's dispatch (``loky.py`` is the pool; `_LokyDispatch` is its
mixin): which queued task goes to which slot, which slots start and which
retire, decided under the pool's lock (`_LokyDispatch._plan`); and the pool's
side of the manager's caps across keys, the worker budget
(``max_total_workers``, `budget.BudgetedPool`) and the busy places
(``max_busy_workers``, `budget.PlacedPool`), whose contracts ``budget.py``
and ``_places.py`` hold.

Under the caps a slot is a worker as the budget counts them: the pool starts
no slot beyond its allowance; above it, its idle and starting slots retire
at once and its busy ones take no more tasks and retire as they go idle. A
slot holds a busy place from the moment it is handed a task while idle (a
new slot: as it is made) until it has answered all it was handed and no
more work is queued, or its time slice is over while another pool waits
(`budget.PlaceRules`); a slot closed while holding one gives it back.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ._dispatch import RunTimes
from ._loky_exit import _live_pools, plan_at_exit
from ._loky_slots import HANDED_PER_SLOT, _Actions, _LokyTaskFuture, _Slot
from ._places import grant_places
from ._queued import _SUBMITTED
from .budget import BudgetReport

if TYPE_CHECKING:
    from .budget import BusySlots, WorkerBudget

__all__: list[str] = []


class _LokyDispatch:
    """`LokyWorkerPool`'s decisions and its side of the caps (a mixin: the pool's
    state it uses is declared here for the type checker, made and described
    in `LokyWorkerPool.__init__`; the caps' own state is `_init_caps`')."""

    _lock: threading.Lock
    _slots: list[_Slot]
    _outstanding: set[_LokyTaskFuture]
    _pending: deque[_LokyTaskFuture]
    _waiting: int
    _starts: int
    _stop_sending: bool
    _exiting: bool
    _max_tasks: int | None
    _hard_memory: int | None
    _shut_down: bool
    _counts: list[int]
    _blocked_submits: int
    _estimates: RunTimes
    _idle_timeout: float | None

    if TYPE_CHECKING:

        @property
        def worker_count(self) -> int: ...

        def _check_owner(self) -> None: ...

        def _alone(self, future: _LokyTaskFuture) -> bool: ...

        def _close_slot(self, slot: _Slot, actions: _Actions, kill: bool) -> None: ...

        def _act(self, actions: _Actions, here: bool = False) -> None: ...

    def _init_caps(self) -> None:
        self._budget: WorkerBudget | None = None  # max_total_workers (`attach_budget`)
        self._allowed: int | None = None  # the budget's allowance (None: no budget)
        self._busy_slots: BusySlots | None = None  # max_busy_workers (`attach_budget`)
        self._places_to_return = 0  # busy places given up under _lock, to hand back
        #: Slots whose worker may be alive: made, and not yet shut down (the
        #: budget's ``live``).
        self._live = 0
        #: ``time.monotonic()`` of the last submit (`budget.BudgetedPool`).
        self.last_submit = 0.0

    # -- the caps across keys --------------------------------------------------

    def attach_budget(self, budget: WorkerBudget | None, busy: BusySlots | None = None) -> bool:
        """Run this pool's slots under a manager's ``max_total_workers`` (``budget``)
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

    def budget_report(self) -> BudgetReport:
        """(For the budget) slots granted, slots it could use now, live slots
        (those shutting down included), and those of them not retiring."""
        with self._lock:
            unfinished = len(self._outstanding)
            want = self.worker_count or (1 if unfinished else 0)
            active = sum(1 for slot in self._slots if not slot.retiring)
            return BudgetReport(
                want=want, demand=min(want, unfinished), live=self._live, active=active
            )

    def apply_allowance(self) -> None:
        """(For the budget) take the new allowance (a level: `_plan` matches it)."""
        budget = self._budget
        if budget is None:
            return
        allowed = budget.allowed(self)
        actions = _Actions()
        with self._lock:
            self._allowed = allowed
            self._plan(actions)
        self._act(actions)

    def place_granted(self) -> None:
        """(For `BusySlots`) a place was handed to this pool: use it, or hand it on."""
        actions = _Actions()
        with self._lock:
            self._plan(actions)
        self._act(actions)
        # Unconditionally: it also hands back a place handed to us and not taken.
        self._return_places()

    def _asks_budget(self) -> bool:
        """(Holds _lock; after a submit) it could use more slots than it is allowed now."""
        if self._budget is None or len(self._outstanding) > self.worker_count:
            return False
        active = sum(1 for slot in self._slots if not slot.retiring)
        if active < (self._allowed or 0):
            return False  # (it starts slots itself)
        return active < min(self.worker_count, len(self._outstanding))

    def _return_places(self) -> None:
        """Give back the places of slots that went idle or closed (no lock held)."""
        busy = self._busy_slots
        if busy is None:
            return
        with self._lock:
            count, self._places_to_return = self._places_to_return, 0
        grant_places(busy.give_back(self, count))

    def _tell_budget(self, actions: _Actions, slots_gone: int = 0) -> None:
        """(No lock held) Tell the budget of finished tasks and exited workers, and
        hand back the busy places given up."""
        if self._places_to_return:
            self._return_places()
        budget = self._budget
        if budget is not None and (actions.finished or slots_gone):
            budget.changed(self, went_idle=actions.went_idle, worker_ended=slots_gone > 0)

    def _slot_gone(self) -> None:
        """A slot's worker is gone (its executor shut down, or never made): its
        place in the budget is free (no lock held)."""
        with self._lock:
            self._live -= 1
        self._tell_budget(_Actions(), slots_gone=1)

    def _leave_caps(self) -> None:
        """(Disposed, every slot shut down) out of the line for places, out of the budget."""
        busy = self._busy_slots
        if busy is not None:
            self._return_places()
            grant_places(busy.leave(self))
        if self._budget is not None:
            self._budget.unregister(self)  # its places return to the budget

    def _release_place(self, slot: _Slot) -> None:
        """(Holds _lock) ``slot`` gives its busy place up (handed back off the lock)."""
        if slot.holds_place:
            slot.holds_place = False
            self._places_to_return += 1

    def _take_place(self, slot: _Slot | None, now: float) -> bool:
        """(Holds _lock) A busy place for ``slot`` (idle, or None: one to start);
        True without the cap. False puts the pool in line for one."""
        busy = self._busy_slots
        if busy is None or (slot is not None and slot.holds_place):
            return True
        if not busy.take(self):
            return False
        if slot is not None:
            slot.holds_place, slot.place_since = True, now
        return True

    # -- decisions (under _lock) ---------------------------------------------

    def _slot_limit(self) -> int:
        """(Holds _lock) The most slots it may run now: its grant, or its allowance."""
        allowed = self._allowed
        return max(1, self.worker_count) if allowed is None else allowed

    def _plan(self, actions: _Actions) -> None:
        """(Holds _lock) Hand queued tasks to ready slots, and start slots, as the
        grant (and the caps) allow; retire the slots beyond them.

        An idle slot takes a task first; then slots start for what is still
        queued, each handed its first task as it starts (running from then
        on, as in ``ProcessPoolExecutor``'s call queue before its workers
        are up; sent once the slot is ready); then a busy slot takes a
        second task, for what the starting slots will not take.
        """
        limit = self._slot_limit()
        over = self._shrink(limit, actions)
        busy = self._busy_slots
        now = time.monotonic()
        rules = None if busy is None else busy.rules(self, now)
        if rules is not None:
            for slot in rules.slice_over(self._slots):
                self._release_place(slot)
        if not self._stop_sending and self._waiting:
            self._dispatch(limit, over, rules, now, actions)
        if busy is not None:
            more_coming = bool(self._waiting or self._blocked_submits)
            for slot in busy.places_to_release(self._slots, more_coming):
                self._release_place(slot)
        if self._idle_timeout is not None:
            for slot in self._slots:
                if slot.handed or not slot.ready:
                    slot.idle_since = None
                elif slot.idle_since is None:
                    slot.idle_since = now
                    actions.watch = True  # (the watch retires it once idle too long)

    def _dispatch(self, limit: int, over: bool, rules: Any, now: float, actions: _Actions) -> None:
        """(Holds _lock; `_plan`) Hand out what is queued; ``over``: busy slots
        stand above the limit (they take no more)."""
        ready = [slot for slot in self._slots if slot.ready and not slot.retiring]
        if self._exiting:
            plan_at_exit(self, ready, actions)  # type: ignore[arg-type]
            return
        for slot in ready:
            if not self._waiting:
                return
            if not slot.handed:
                if not self._take_place(slot, now):
                    break
                self._hand(slot, actions)
        starting = sum(1 for slot in self._slots if not slot.ready and not slot.retiring)
        more = min(limit - len(self._slots), self._waiting)
        if more > 0:
            _live_pools.add(self)  # type: ignore[arg-type]  # (for the exit hook)
        for _ in range(more):
            if not self._take_place(None, now):
                break
            # (A closed slot, shutting down, takes no task: its index is free.)
            taken = {slot.index for slot in self._slots}
            slot = _Slot(next(i for i in itertools.count() if i not in taken))
            if self._busy_slots is not None:
                slot.holds_place, slot.place_since = True, now
            self._slots.append(slot)
            self._starts += 1
            self._live += 1
            actions.starts.append(slot)
            self._hand(slot, actions)
            starting += 1
        if over:
            return
        for slot in ready:
            if self._waiting <= starting:
                return
            if (
                0 < len(slot.handed) < HANDED_PER_SLOT
                and not slot.retiring
                and (rules is None or rules.may_hand_more(slot))
                and self._may_wait_behind(slot.handed[0])
                and self._may_wait_behind(self._next_queued())
            ):
                self._hand(slot, actions)

    def _may_wait_behind(self, future: _LokyTaskFuture) -> bool:
        """(Holds _lock) May a second task wait in ``future``'s slot, behind it or
        with it ahead? Only for short kinds of task (`RunTimes.depth`): a long
        or unknown one is alone, so that the tasks queued behind it stay
        cancellable and go to whichever slot frees first, and a slot the
        caps take back gives its place up after its one task; and never a
        task that must run alone (`_LokyLimits._alone`)."""
        return self._estimates.depth(future.kind) > 1 and not self._alone(future)

    def _shrink(self, limit: int, actions: _Actions) -> bool:
        """(Holds _lock) Slots beyond ``limit`` retire: those that hold no task at
        once; busy ones (starting ones too: each holds its first task) take no
        more and retire as they go idle (the next `_plan`), as the budget
        expects of a worker above its allowance. True: busy ones still stand
        above it."""
        serving = [slot for slot in self._slots if not slot.retiring]
        excess = len(serving) - limit
        for slot in serving:
            if excess <= 0:
                break
            if not slot.handed:
                slot.retiring = True
                excess -= 1
                self._close_slot(slot, actions, kill=not slot.ready)
        return excess > 0

    def _next_queued(self) -> _LokyTaskFuture:
        """(Holds _lock) The next queued task (there is one), past cancelled ones."""
        pending = self._pending
        while pending[0]._dropped:
            pending.popleft()
        return pending[0]

    def _hand(self, slot: _Slot, actions: _Actions) -> None:
        """(Holds _lock) Hand ``slot`` the next queued task (there is one)."""
        future = self._next_queued()
        self._pending.popleft()
        self._waiting -= 1
        if not future._sent:
            future._sent = True
            future.set_running_or_notify_cancel()
        slot.handed.append(future)
        slot.unsent.append(future)
        slot.taken += 1
        if self._max_tasks is not None and slot.taken >= self._max_tasks:
            slot.retiring = True  # (shut down once it holds none)
        if slot.ready:
            self._sending(slot, [future], actions)
        # (Else sent once the slot is ready: `_ready`.)

    def _sending(self, slot: _Slot, futures: list[_LokyTaskFuture], actions: _Actions) -> None:
        """(Holds _lock) ``futures``, handed to ready ``slot``, go to loky now: their
        deadlines start (each such task is alone in the slot: it starts now)."""
        now = time.monotonic()
        for future in futures:
            future._sent_at = now
            if future.timeout is not None:
                future._deadline = now + future.timeout
                actions.watch = True
        if self._hard_memory is not None:
            actions.watch = True
        if slot not in actions.feeds:
            actions.feeds.append(slot)

    def _requeue(self, futures: list[_LokyTaskFuture]) -> None:
        """(Holds _lock) Tasks handed to a slot that never started them: to the queue's front."""
        for future in reversed(futures):
            future._deadline = None
            self._pending.appendleft(future)
            self._waiting += 1
