"""The machine-wide worker budget: ``WorkerPoolManager(..., max_total_workers=N)``.

Each key's pool is capped at ``pool_size`` workers; the budget caps them all
together. Without it, ten keys of ``pool_size=2`` are twenty processes, on a
machine with two cores.

What is counted
    Each pool has an *allowance*: the worker processes it may run. The
    budget keeps the sum of every pool's allowance at or below ``N``,
    always; a pool never starts a worker beyond its allowance. A place
    counts as taken while its pool's live workers are above its allowance
    (they are leaving): a place handed from one pool to another is handed
    once the worker that gave it up has exited. Only a worker replaced
    within its own pool (recycled after ``max_tasks_per_worker`` or
    ``max_worker_memory``, or leaving at its idle timeout) may overlap its
    replacement for a moment, so live processes can exceed ``N`` by those.

    (`default_limit` is never below the manager's ``pool_size``.)

The default
    ``max_total_workers`` defaults to ``DEFAULT_WORKERS_PER_CPU`` (4) times
    the CPUs this process may use, and at least ``MIN_DEFAULT_WORKERS`` (32)
    (`default_limit`): it caps memory, and an idle worker forked from the
    fork server costs about 3 MB, while a warm one spares its key a start.
    CPU is capped apart, by ``max_busy_workers`` (`BusySlots`, in ``_places.py``).
    ``None``: no cap (each pool still keeps its ``pool_size``).

Growing
    A pool whose allowance is below what it could use (its granted
    ``worker_count``, and no more than its unfinished tasks) asks the budget
    on ``submit``. Room left in the budget is granted at once. When the
    budget is full, it takes allowance that another pool cannot use now: a
    pool with more allowance than unfinished tasks gives it up, least
    recently used first (by last submit), and its surplus idle workers are
    told to leave (an ``EXIT`` message). If no allowance is unused, the
    task waits in its pool's queue: it is never refused and never lost.

The fairness rule (no key starves another)
    Let ``P`` be the pools with unfinished work. Each has a *fair share* of
    ``max(1, ceil(N / len(P)))`` workers, never more than it could use.

    1. A pool below its fair share is *waiting*. Free or unused allowance
       goes first to waiting pools, the longest waiting first; only then to
       pools that could use more than their fair share.
    2. When a pool is waiting and nothing is free, a pool above its fair
       share (the most above first, then least recently used) gives one
       worker back: it leaves after its current task (the pool sends it
       ``EXIT`` when that task's result arrives), and its
       allowance passes to the waiting pool at once.
    3. When more pools have work than ``N`` (each fair share is 1 and no pool
       is above it), the pools take turns: at each rebalance while a pool
       waits, the pool that has held its running worker longest (since an
       earlier rebalance) gives it up after its current task and joins the
       back of the queue, and the longest waiting pool gets the place. Every
       pool with work therefore runs a task within about ``len(P) / N``
       turns. (A turn may be a single task: under that much overload, each
       hand-over costs a worker start, tens of milliseconds.)

    So one key flooding its pool delays another key's single task by at
    most the task its worker is running (plus starting a worker, tens of
    milliseconds), however long the flood's backlog.

When it runs, and why no wake-up is lost
    Rebalancing runs on ``submit`` (when the pool wants more), when a task
    finishes while some pool is waiting (or goes idle while some pool is
    short, or some submit wanted more while the budget was full), when a
    worker exits, when a pool is disposed, and at a supervisor sweep while
    a pool waits or is short or such a submit is unplanned (`sweep`). It
    never blocks: if a rebalance is running on another thread, that one
    runs again instead. Two rules keep it from losing a change:

    * An allowance is a level, not a step. A pool keeps its live workers at
      or below it at every dispatch (idle ones above it leave at once, busy
      ones as they go idle, and those get no more work meanwhile), whatever
      happened between the plan and the moment it was told. A worker that
      leaves rebalances the budget as it exits, so its place is handed on.
    * Every change a pool reports bumps a generation count. A plan reads the
      pools one by one; if it leaves a pool waiting or short and the count
      moved while it planned, it plans again with what changed.

    The budget's own lock guards only its bookkeeping; it is never held
    while a pool's lock is taken (the pools' locks may be held while it is
    taken: it is the innermost lock). Pools are told of a new allowance
    with no lock of the budget's held.

The pools' side
    `BudgetedPool` names all the budget calls on a pool: it reads the
    pool's `BudgetReport` (``want``, ``demand``, ``live``) and its
    ``last_submit``, and gives one order, `BudgetedPool.apply_allowance`
    ("look at your allowance": a level to reach, see above). `PlacedPool` is
    what `BusySlots` asks of a pool (`PlacedPool.place_granted`), and
    `PlaceRules` the busy-place policy a pool applies as it dispatches (the
    three live in ``_places.py``, with `BUSY_QUANTUM`; this module
    re-exports them).
    `BaseWorkerPool` implements both protocols, and so do the stand-in pools
    of ``tests/test_budget_model.py``, whose state machines test these rules
    with no processes. The planner (`_Planner`) is pure: one method per rule.

``manager.stats()["budget"]``: the limit, the allowance in use, the live
workers, and the keys' pools waiting for a worker (`BudgetStats`).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypedDict

from . import _process, _threads
from ._durations import to_count

# The busy places (max_busy_workers) live in _places; this module is their
# public home too.
from ._places import BUSY_QUANTUM, BusySlots, PlacedPool, PlaceHolder, PlaceRules

__all__ = [
    "BUSY_QUANTUM",
    "DEFAULT_WORKERS_PER_CPU",
    "MIN_DEFAULT_WORKERS",
    "BudgetReport",
    "BudgetStats",
    "BudgetedPool",
    "BusySlots",
    "PlaceHolder",
    "PlaceRules",
    "PlacedPool",
    "WorkerBudget",
    "default_busy_limit",
    "default_limit",
]

#: ``max_total_workers`` defaults to this many worker processes per usable
#: CPU, and at least ``MIN_DEFAULT_WORKERS``: an idle worker forked from the
#: fork server costs about 2 MB of its own memory, and a warm one spares the
#: next task of its key a start.
DEFAULT_WORKERS_PER_CPU = 4
MIN_DEFAULT_WORKERS = 32


def default_limit(pool_size: int = 1) -> int:
    """The default ``max_total_workers``: see `DEFAULT_WORKERS_PER_CPU`.

    Never below ``pool_size``: a default never holds a lone key's pool below it.
    """
    return max(
        MIN_DEFAULT_WORKERS, DEFAULT_WORKERS_PER_CPU * max(1, _process.cpu_count()), pool_size
    )


def default_busy_limit(pool_size: int = 1) -> int:
    """The default ``max_busy_workers``: one per usable CPU, and at least ``pool_size``.

    A key's pool runs ``pool_size`` tasks at once when it is the only one
    with work, as ``ProcessPoolExecutor(pool_size)`` would (tasks that wait
    for each other need it); with several keys busy, the cap shares the
    places among them.
    """
    return max(1, _process.cpu_count(), pool_size)


class BudgetStats(TypedDict):
    """The worker budget, in `WorkerPoolManager.stats` (``"budget"``)."""

    limit: int | None  #: max_total_workers (None: no cap)
    in_use: int  #: the pools' allowances, plus workers leaving (never above limit)
    pools: int  #: pools under the budget
    waiting: int  #: pools below their fair share, with work waiting
    busy_limit: int | None  #: max_busy_workers (None: no cap)
    busy: int  #: workers running tasks now (or handed a place to)
    busy_waiting: int  #: pools with tasks queued, waiting for a place to run them


# -- the contract between the caps and the pools -----------------------------


class BudgetReport(NamedTuple):
    """What a pool tells `WorkerBudget` of itself at each rebalance
    (`BudgetedPool.budget_report`)."""

    #: The workers it was granted (its ``worker_count``): what it takes at
    #: once, while it has work and the budget has room to spare.
    want: int
    #: The workers it could use now: ``want``, and no more than its
    #: unfinished tasks (queued or running). 0: it has no work.
    demand: int
    #: Its live worker processes, those leaving included: the ones above its
    #: allowance are leaving (it sheds them as they go idle), and their
    #: places count against the budget until they have exited.
    live: int
    #: Of those, the ones not told to leave: busy ones above its allowance
    #: stay until they go idle, so an allowance raised back up to this many
    #: takes no free place (and starts no process).
    active: int


class BudgetedPool(Protocol):
    """What `WorkerBudget` reads from and tells a pool: all it calls on one.

    `BaseWorkerPool` implements it (in its section for the budget), and so
    do the stand-in pools of the tests. Whatever implements it keeps the
    pool's side of the contract: it never runs more workers than its
    allowance (`WorkerBudget.allowed`) but for busy ones above it, which
    get no more work and leave as they go idle; it reports every change
    that may matter (`WorkerBudget.submitted`, `WorkerBudget.changed`,
    `WorkerBudget.unregister`) with none of its locks held.
    """

    @property
    def last_submit(self) -> float:
        """``time.monotonic()`` of its last submit (0.0: none yet).

        Read with no lock (of the pool's or the budget's) held: a stale
        value only orders the pools less exactly by last use.
        """
        ...

    def budget_report(self) -> BudgetReport:
        """What it wants, could use and runs now (`BudgetReport`), read in one go.

        Called by a rebalance with no lock of the budget's held; it may take
        the pool's own lock. It may call back into the budget (``changed``,
        ``submitted``: another thread's change landing while a plan reads
        the pools), never wait for a rebalance.
        """
        ...

    def apply_allowance(self) -> None:
        """The budget's one order: look at your allowance (`WorkerBudget.allowed`)
        and match it from now on.

        An allowance is a level, not a step: the pool reads the newest one
        when it is told, and keeps its live workers at or below it at every
        dispatch from then on (idle ones above it leave at once, busy ones
        as they go idle); below it, with work queued, it starts workers.

        Called with no lock of the budget's held, nor any pool's ``_lock``
        (a disposing pool's ``_dispose_lock`` may be held: it is the
        outermost). It may take its own lock, and call back into the budget
        (``allowed``, ``changed``: a rebalance called from in here only
        makes the running one plan again) and into `BusySlots`.
        """
        ...


# -- the worker budget (max_total_workers) -------------------------------------


@dataclass(eq=False)
class _Account:
    pool: BudgetedPool
    order: int  #: registration order, a tie-breaker
    allowed: int = 0
    last_used: float = 0.0  #: time.monotonic() of its last submit
    waiting_since: int | None = None  #: a ticket (see _Planner): when it began to wait
    held_since: int = 0  #: a ticket: when it last got a worker
    # Filled in by each rebalance, from the pool's BudgetReport:
    demand: int = 0  #: workers it could use now: granted, and no more than its unfinished tasks
    want: int = 0  #: workers it was granted (used while there is room)
    #: Its live worker processes, leaving ones included: those above its
    #: allowance are leaving (the pool sheds them as they go idle), and their
    #: places count against the budget until they have exited.
    live: int = 0
    active: int = 0  #: live workers not told to leave (see `BudgetReport.active`)


def _first(ticket: int | None) -> float:
    return math.inf if ticket is None else ticket


class WorkerBudget:
    """At most ``limit`` worker processes allowed across the pools attached to it.

    A manager owns one and attaches it to every `BaseWorkerPool` it leases;
    see the module docstring for the rules. ``limit=None`` caps nothing.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = None if limit is None else to_count("max_total_workers", limit, minimum=1)
        # _lock guards _accounts, every _Account's fields, _generation and
        # the published results of the last plan (_waiting, _short, _in_use).
        # The innermost lock: nothing else is acquired under it.
        self._lock = threading.Lock()
        self._accounts: dict[int, _Account] = {}  # by id(pool)
        self._order = itertools.count()
        self._ticket = itertools.count(1)
        self._waiting = 0
        self._short = 0  # pools allowed fewer workers than they could use
        #: A submit wanted more workers while the budget was full, and no plan
        #: has read its pool since (see `submitted`, `sweep`).
        self._unplanned = False
        self._in_use = 0  # places taken, at the last rebalance
        #: Bumped by every change a pool reports (`changed`). A plan works on
        #: a snapshot of the pools; one that sees the generation moved while
        #: it planned, and left a pool short, plans again: so a change that
        #: came too late for the snapshot is never lost.
        self._generation = 0
        # One rebalance at a time; a request during one makes it run again.
        self._rebalancing = threading.Lock()
        self._again = False

    @property
    def limit(self) -> int | None:
        return self._limit

    # -- the pools' side ---------------------------------------------------

    def register(self, pool: BudgetedPool) -> None:
        with self._lock:
            self._accounts.setdefault(
                id(pool), _Account(pool, next(self._order), last_used=time.monotonic())
            )

    def unregister(self, pool: BudgetedPool) -> None:
        """The pool is disposed: its allowance returns to the budget."""
        with self._lock:
            account = self._accounts.pop(id(pool), None)
            self._generation += 1
        if account is not None and (account.allowed or account.live):
            self.rebalance()

    def allowed(self, pool: BudgetedPool) -> int:
        """The workers ``pool`` may run now (may be 0: its tasks wait)."""
        with self._lock:
            account = self._accounts.get(id(pool))
            return account.allowed if account is not None else 0

    def submitted(self, pool: BudgetedPool, wants_more: bool) -> None:
        """``pool`` accepted a task; ``wants_more``: it could use more workers than allowed."""
        with self._lock:
            account = self._accounts.get(id(pool))
            if account is None:
                return
            self._generation += 1
            account.last_used = time.monotonic()
            # A full budget is rebalanced as tasks finish (see `changed`): a
            # submit need not pay for it, unless the pool has no worker at all.
            worth_it = account.allowed == 0 or self._limit is None or self._in_use < self._limit
            if wants_more and not worth_it:
                self._unplanned = True
        if wants_more and worth_it:
            self.rebalance()

    def changed(self, pool: BudgetedPool, went_idle: bool, worker_ended: bool) -> None:
        """``pool`` finished tasks (``went_idle``: it has none left) or lost a worker.

        Call with no lock held, after the change is visible in the pool.
        Rebalances when it can matter: some pool waits for its fair share, or
        could use more and this pool's workers are now free, or a worker's
        place came free. Otherwise it only marks the change, so a plan in
        progress (which may have read the pool before it) runs again.
        """
        with self._lock:
            if id(pool) not in self._accounts:
                return
            self._generation += 1
            needed = (
                worker_ended
                or self._waiting > 0
                or self._unplanned
                or (went_idle and self._short > 0)
            )
        if needed:
            # (On the I/O loop, once at the end of its round, for all the
            # results of the round: see _threads.defer.)
            _threads.defer(self.rebalance)

    # -- rebalancing -------------------------------------------------------

    def rebalance(self) -> None:
        """Apply the rules of the module docstring now (never blocks on another rebalance)."""
        if self._limit is None:
            return
        while True:
            self._again = True
            if not self._rebalancing.acquire(blocking=False):
                return  # the thread rebalancing now will run again
            try:
                while self._again:
                    self._again = False
                    self._rebalance_once()
            finally:
                self._rebalancing.release()
            if not self._again:
                return

    def sweep(self) -> None:
        """(The supervisor's sweep) rebalance if a plan may change anything: a pool
        waits or is short, or a submit wanted more while the budget was full.

        Otherwise every change already rebalanced as it happened (a submit
        that could be served, a worker's exit, a pool's disposal), and the
        last plan still stands: a sweep after each released lease does not
        plan again for nothing.
        """
        with self._lock:
            needed = self._waiting > 0 or self._short > 0 or self._unplanned
        if needed:
            self.rebalance()

    def _rebalance_once(self) -> None:
        with self._lock:
            accounts = list(self._accounts.values())
            generation = self._generation
            self._unplanned = False  # (a submit from now on sets it again)
        # What each pool could use and runs now: read outside our lock (it
        # takes each pool's lock in turn).
        reports = {id(a): a.pool.budget_report() for a in accounts}
        with self._lock:
            accounts = [a for a in self._accounts.values() if id(a) in reports]
            for account in accounts:
                report = reports[id(account)]
                account.want = report.want
                account.demand = report.demand
                account.live = report.live
                account.active = report.active
                # Each submit stamps its pool (no lock on that hot path).
                account.last_used = max(account.last_used, account.pool.last_submit)
            changed = self._plan(accounts)
            if (self._waiting or self._short) and self._generation != generation:
                self._again = True  # a pool changed after it was read: plan again
        # Each pool changed takes its new allowance (shrinking ones first),
        # with no lock of ours held.
        changed.sort(key=lambda a: a.allowed >= a.live)
        for account in changed:
            account.pool.apply_allowance()

    def _plan(self, accounts: list[_Account]) -> list[_Account]:
        """Move allowance between pools (holds _lock). Returns the pools to tell."""
        assert self._limit is not None
        planner = _Planner(self._limit, accounts, self._ticket)
        to_tell = planner.plan()
        self._waiting = planner.waiting
        self._short = sum(1 for a in accounts if a.allowed < a.demand)
        self._in_use = sum(planner.occupied(a) for a in accounts)
        return to_tell

    # -- stats ---------------------------------------------------------------

    def stats(self, busy: BusySlots | None = None) -> BudgetStats:
        busy_limit, busy_now, busy_waiting = busy.counts() if busy is not None else (None, 0, 0)
        with self._lock:
            return BudgetStats(
                limit=self._limit,
                in_use=sum(max(a.allowed, a.live) for a in self._accounts.values()),
                pools=len(self._accounts),
                waiting=self._waiting,
                busy_limit=busy_limit,
                busy=busy_now,
                busy_waiting=busy_waiting,
            )


class _Planner:
    """One plan: the rules of the module docstring, applied in turn to the accounts.

    Pure: it reads and changes only the accounts (their ``allowed``,
    ``waiting_since`` and ``held_since``), calls no pool, and takes no lock
    (`WorkerBudget._plan` runs it under the budget's). Its tickets come from
    the budget's counter, so that "waiting since" and "held since" order
    events across plans as well as within one.

    `plan` runs the steps in this order, each a method below: mark the
    pools below their fair share as waiting; grant fair shares from what is
    free; take back allowance pools cannot use now; grant fair shares
    again, then demands, then wants; take places from busy pools for the
    pools still waiting (rules 2 and 3); hand out what that freed at once;
    mark the waiting again.
    """

    def __init__(self, limit: int, accounts: list[_Account], tickets: Iterator[int]) -> None:
        self.limit = limit
        self.accounts = accounts
        self._tickets = tickets
        #: Tickets, not times: they order events within one plan too.
        self.started = next(tickets)
        self._before = {id(a): a.allowed for a in accounts}
        busy = [a for a in accounts if a.demand > 0]
        #: Each pool with work's fair share, before its demand caps it (`fair`).
        self.share = max(1, math.ceil(limit / len(busy))) if busy else limit
        self.waiting = 0  #: pools below their fair share, when the plan is done
        #: The pools rules 2 and 3 took a place from in this plan (by id).
        self.donors: set[int] = set()

    def plan(self) -> list[_Account]:
        """Run every rule; returns the pools to tell (`to_tell`)."""
        self.mark_waiting()
        self.grant_fair_shares()
        self.take_back_unused()
        self.grant_fair_shares()
        self.grant_demands()
        self.grant_wants()
        self.take_from_busy()
        self.grant_freed()
        self.waiting = self.mark_waiting()
        return self.to_tell()

    # -- measures ----------------------------------------------------------

    def ticket(self) -> int:
        return next(self._tickets)

    def fair(self, account: _Account) -> int:
        """Its fair share: ``max(1, ceil(N / pools with work))``, and no more than its demand."""
        return min(account.demand, self.share)

    @staticmethod
    def occupied(account: _Account) -> int:
        """The places it takes: its allowance, or its live workers if more (some are leaving)."""
        return max(account.allowed, account.live)

    def free(self) -> int:
        """Places neither allowed to a pool nor held by a worker still leaving."""
        return self.limit - sum(self.occupied(a) for a in self.accounts)

    # -- the rules -----------------------------------------------------------

    def mark_waiting(self) -> int:
        """A pool below its fair share is waiting: it keeps the ticket of when it
        began to (its place in the queue); a pool at or above it leaves the
        queue. Returns how many wait."""
        waiting = 0
        for account in self.accounts:
            if account.allowed < self.fair(account):
                waiting += 1
                if account.waiting_since is None:
                    account.waiting_since = self.ticket()
            else:
                account.waiting_since = None
        return waiting

    def hand_out(self, cap: Callable[[_Account], int]) -> None:
        """Free places go to the pools below ``cap``, the longest waiting first
        (then the earliest registered), one place each in turn, until none
        is free or every pool has reached its cap.

        A pool whose busy worker (not told to leave) stands above its
        allowance, from an earlier plan's rule 2 or 3, takes its allowance
        back up to that worker at no cost in free places: the worker holds
        its place already, and now stays. Never ahead of its turn: once a
        pool cannot be served, none behind it is (else a pool that gave its
        place up for one waiting before it would take it straight back); and
        not a donor of this plan (that would undo the plan).
        """
        needy = [a for a in self.accounts if a.allowed < cap(a)]
        needy.sort(key=lambda a: (_first(a.waiting_since), a.order))
        room = self.free()
        progress = True
        while progress:
            progress = False
            for account in needy:  # one at a time, in turn
                if account.allowed >= cap(account):
                    continue
                holds = account.allowed < account.active and id(account) not in self.donors
                cost = 0 if holds else 1
                if cost > room:
                    return
                account.allowed += 1
                account.held_since = self.ticket()
                room -= cost
                progress = True

    def grant_fair_shares(self) -> None:
        """Rule 1: what is free goes first to the pools below their fair share."""
        self.hand_out(self.fair)

    def take_back_unused(self) -> None:
        """Growing: allowance a pool cannot use now (more than its unfinished
        work) is taken back, least recently used pool first, while the pools
        want more than is free (free places, and the places that workers
        leaving will free)."""
        accounts = self.accounts
        wanted = sum(max(0, a.demand - a.allowed) for a in accounts)
        room = max(0, self.free()) + sum(max(0, a.live - a.allowed) for a in accounts)
        if wanted <= room:
            return
        for account in sorted(accounts, key=lambda a: (a.last_used, a.order)):
            unused = account.allowed - account.demand
            if unused > 0:
                account.allowed -= unused
                room += unused
                if wanted <= room:
                    return

    def grant_demands(self) -> None:
        """Then, what is still free goes to the pools below what they could use now."""
        self.hand_out(lambda a: a.demand)

    def grant_wants(self) -> None:
        """Room to spare: a pool with work gets all it was granted at once, as
        without a budget (its workers then take the tasks that come next)."""
        self.hand_out(lambda a: a.want if a.demand > 0 else 0)

    def take_from_busy(self) -> None:
        """Rules 2 and 3: a pool still below its fair share takes the place of
        a busy worker elsewhere (it leaves after its current task: the
        donor's allowance drops now, and its pool sheds the worker as it goes
        idle), unless workers already leaving will free enough places. The
        pools waiting longest are served first; a donor left below its own
        fair share joins the back of the queue."""
        accounts = self.accounts
        incoming = sum(max(0, self.occupied(a) - a.allowed) for a in accounts)
        waiters = sorted(
            (a for a in accounts if a.allowed < self.fair(a)),
            key=lambda a: (_first(a.waiting_since), a.order),
        )
        for waiter in waiters:
            need = self.fair(waiter) - waiter.allowed
            covered = min(need, incoming)
            incoming -= covered
            need -= covered
            while need > 0:
                donor = self.most_above_share(waiter) or self.longest_holder(waiter)
                if donor is None:
                    return  # donors only ever become fewer: the next waiters find none
                donor.allowed -= 1
                self.donors.add(id(donor))
                need -= 1
                if donor.allowed < self.fair(donor) and donor.waiting_since is None:
                    donor.waiting_since = self.ticket()  # the back of the queue

    def grant_freed(self) -> None:
        """A donor of rules 2 and 3 may give up allowance it did not use (more
        than its live workers): that place is free at once, and goes as free
        places do (fair shares first, then demands), not to wait for the next
        plan while a pool waits."""
        self.grant_fair_shares()
        self.grant_demands()

    def most_above_share(self, waiter: _Account) -> _Account | None:
        """Rule 2's donor: the pool most above its fair share, then the least
        recently used (None: no pool is above it)."""
        over = [a for a in self.accounts if a.allowed > self.fair(a) and a is not waiter]
        if not over:
            return None
        return max(over, key=lambda a: (a.allowed - self.fair(a), -a.last_used))

    def longest_holder(self, waiter: _Account) -> _Account | None:
        """Rule 3's donor, when no pool is above its fair share (taking turns):
        of the pools with work at their fair share whose workers have been
        running since an earlier plan (so each has a task to finish before
        it leaves), the one that has held its place longest (None: none)."""
        holders = [
            a
            for a in self.accounts
            if a is not waiter
            and a.demand > 0
            and a.allowed >= self.fair(a) > 0
            and a.held_since < self.started
            and a.live >= a.allowed
        ]
        if not holders:
            return None
        return min(holders, key=lambda a: (a.held_since, a.order))

    def to_tell(self) -> list[_Account]:
        """The pools to tell (`BudgetedPool.apply_allowance`): each whose
        allowance changed, and only those. A pool reads its allowance afresh
        when told, and then matches it on its own at each dispatch: it sheds
        workers above it (idle ones at once, busy ones as they go idle) and
        starts workers below it when it has work and may (a place under
        ``max_busy_workers``, no start failing). Telling again a pool whose
        workers do not match yet changes nothing; it cost more than the plan
        itself once plans came every I/O loop round (most such pools were
        waiting for a busy place, not for the budget).
        """
        before = self._before
        return [a for a in self.accounts if a.allowed != before[id(a)]]
