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
    CPU is capped apart, by ``max_busy_workers`` (`BusySlots`, below).
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
    short), when a worker exits, when a pool is disposed, and at each
    supervisor sweep. It never blocks: if a rebalance is running on another
    thread, that one runs again instead. Two rules keep it from losing a
    change:

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

``manager.stats()["budget"]``: the limit, the allowance in use, the live
workers, and the keys' pools waiting for a worker (`BudgetStats`).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from . import _process
from ._durations import to_count

if TYPE_CHECKING:
    from .pool import BaseWorkerPool

__all__ = [
    "DEFAULT_WORKERS_PER_CPU",
    "MIN_DEFAULT_WORKERS",
    "BudgetStats",
    "BusySlots",
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


@dataclass(eq=False)
class _Account:
    pool: BaseWorkerPool
    order: int  #: registration order, a tie-breaker
    allowed: int = 0
    last_used: float = 0.0  #: time.monotonic() of its last submit
    waiting_since: int | None = None  #: a ticket (see _plan): when it began to wait
    held_since: int = 0  #: a ticket: when it last got a worker
    # Filled in by each rebalance, from the pool:
    demand: int = 0  #: workers it could use now: granted, and no more than its unfinished tasks
    want: int = 0  #: workers it was granted (used while there is room)
    #: Its live worker processes, leaving ones included: those above its
    #: allowance are leaving (the pool sheds them as they go idle), and their
    #: places count against the budget until they have exited.
    live: int = 0


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

    def register(self, pool: BaseWorkerPool) -> None:
        with self._lock:
            self._accounts.setdefault(
                id(pool), _Account(pool, next(self._order), last_used=time.monotonic())
            )

    def unregister(self, pool: BaseWorkerPool) -> None:
        """The pool is disposed: its allowance returns to the budget."""
        with self._lock:
            account = self._accounts.pop(id(pool), None)
            self._generation += 1
        if account is not None and (account.allowed or account.live):
            self.rebalance()

    def allowed(self, pool: BaseWorkerPool) -> int:
        """The workers ``pool`` may run now (may be 0: its tasks wait)."""
        with self._lock:
            account = self._accounts.get(id(pool))
            return account.allowed if account is not None else 0

    def submitted(self, pool: BaseWorkerPool, wants_more: bool) -> None:
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
        if wants_more and worth_it:
            self.rebalance()

    def changed(self, pool: BaseWorkerPool, went_idle: bool, worker_ended: bool) -> None:
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
            needed = worker_ended or self._waiting > 0 or (went_idle and self._short > 0)
        if needed:
            self.rebalance()

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

    def _rebalance_once(self) -> None:
        with self._lock:
            accounts = list(self._accounts.values())
            generation = self._generation
        # What each pool could use and runs now: read outside our lock (it
        # takes each pool's lock in turn).
        info = {id(a): a.pool._budget_info() for a in accounts}
        with self._lock:
            accounts = [a for a in self._accounts.values() if id(a) in info]
            for account in accounts:
                account.want, account.demand, account.live = info[id(account)]
                # Each submit stamps its pool (no lock on that hot path).
                account.last_used = max(
                    account.last_used, getattr(account.pool, "last_submit", 0.0)
                )
            changed = self._plan(accounts)
            if (self._waiting or self._short) and self._generation != generation:
                self._again = True  # a pool changed after it was read: plan again
        # Each pool changed takes its new allowance (shrinking ones first),
        # with no lock of ours held.
        changed.sort(key=lambda a: a.allowed >= a.live)
        for account in changed:
            account.pool._budget_apply()

    def _plan(self, accounts: list[_Account]) -> list[_Account]:
        """Move allowance between pools (holds _lock). Returns the pools to tell."""
        assert self._limit is not None
        # Tickets, not times: they order events within one plan too.
        plan_started = next(self._ticket)

        def ticket() -> int:
            return next(self._ticket)

        limit = self._limit
        before = {id(a): a.allowed for a in accounts}
        busy = [a for a in accounts if a.demand > 0]
        share = max(1, math.ceil(limit / len(busy))) if busy else limit

        def fair(account: _Account) -> int:
            return min(account.demand, share)

        for account in accounts:
            if account.allowed < fair(account):
                if account.waiting_since is None:
                    account.waiting_since = ticket()
            else:
                account.waiting_since = None

        def occupied(account: _Account) -> int:
            # Its allowance, or its live workers if more (some are leaving).
            return max(account.allowed, account.live)

        def free() -> int:
            return limit - sum(occupied(a) for a in accounts)

        def hand_out(cap: Callable[[_Account], int]) -> None:
            needy = [a for a in accounts if a.allowed < cap(a)]
            needy.sort(key=lambda a: (_first(a.waiting_since), a.order))
            room = free()
            progress = True
            while progress:
                progress = False
                for account in needy:  # one at a time, in turn
                    # A raise that a live worker already stands in (one
                    # above the allowance, busy) takes no free place.
                    cost = 1 if account.allowed >= account.live else 0
                    if cost <= room and account.allowed < cap(account):
                        account.allowed += 1
                        account.held_since = ticket()
                        room -= cost
                        progress = True

        # Rule 1, with what is free.
        hand_out(fair)
        # Allowance a pool cannot use now (more than its unfinished work),
        # least recently used pool first, while some pool wants more.
        # (Free places, and places that workers leaving will free.)
        wanted = sum(max(0, a.demand - a.allowed) for a in accounts)
        room = max(0, free()) + sum(max(0, a.live - a.allowed) for a in accounts)
        if wanted > room:
            for account in sorted(accounts, key=lambda a: (a.last_used, a.order)):
                unused = account.allowed - account.demand
                if unused > 0:
                    account.allowed -= unused
                    room += unused
                    if wanted <= room:
                        break
        hand_out(fair)
        hand_out(lambda a: a.demand)
        # Room to spare: a pool with work gets all it was granted at once, as
        # without a budget (its workers then take the tasks that come next).
        hand_out(lambda a: a.want if a.demand > 0 else 0)

        # Rules 2 and 3: a pool below its fair share takes a busy worker's
        # place, unless workers already leaving will free enough of them.
        incoming = sum(max(0, occupied(a) - a.allowed) for a in accounts)
        waiters = sorted(
            (a for a in accounts if a.allowed < fair(a)),
            key=lambda a: (_first(a.waiting_since), a.order),
        )
        no_donor = False
        for waiter in waiters:
            if no_donor:
                break  # donors only ever become fewer: the next waiters find none
            need = fair(waiter) - waiter.allowed
            covered = min(need, incoming)
            incoming -= covered
            need -= covered
            while need > 0:
                over = [a for a in accounts if a.allowed > fair(a) and a is not waiter]
                if over:
                    donor = max(over, key=lambda a: (a.allowed - fair(a), -a.last_used))
                else:
                    # Taking turns: a pool whose workers have been running
                    # since an earlier rebalance (so each has a task to finish
                    # before it leaves), the longest holder first.
                    holders = [
                        a
                        for a in accounts
                        if a is not waiter
                        and a.demand > 0
                        and a.allowed >= fair(a) > 0
                        and a.held_since < plan_started
                        and a.live >= a.allowed
                    ]
                    if not holders:
                        no_donor = True
                        break
                    donor = min(holders, key=lambda a: (a.held_since, a.order))
                donor.allowed -= 1
                need -= 1
                if donor.allowed < fair(donor) and donor.waiting_since is None:
                    donor.waiting_since = ticket()  # the back of the queue

        waiting = 0
        for account in accounts:
            if account.allowed < fair(account):
                waiting += 1
                if account.waiting_since is None:
                    account.waiting_since = ticket()
            else:
                account.waiting_since = None
        self._waiting = waiting
        self._short = sum(1 for a in accounts if a.allowed < a.demand)
        self._in_use = sum(occupied(a) for a in accounts)

        # Tell each pool whose allowance changed; and, so that no order is
        # ever lost, each whose workers do not match it yet: more live than
        # allowed (the pool sheds them: idle ones at once, busy ones as they
        # go idle), or fewer than allowed with work waiting (it starts them).
        return [
            a
            for a in accounts
            if a.allowed != before[id(a)] or a.live > a.allowed or a.live < min(a.allowed, a.demand)
        ]

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


class BusySlots:
    """At most ``limit`` workers running tasks at once, across the pools that share it.

    ``max_total_workers`` caps the processes alive (memory); this caps the
    processes working (CPU), so that many keys' warm pools never
    oversubscribe the machine. A worker takes a place when it is handed
    work while idle, and gives it back when it has run all it was handed
    and its pool has no more on the way. A pool that finds no place free
    waits in line (first come, first served); a place given back goes to
    the first pool in line. While a pool waits, a worker elsewhere is
    handed more work only within a time slice of its place (40 ms, see
    ``pool.BUSY_QUANTUM``), so the places go round the pools with work and
    no key starves another.

    The lock is innermost: pools call in holding their own lock, and the
    pool a place is handed to is told (`BaseWorkerPool._place_granted`) with
    no lock held.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = None if limit is None else to_count("max_busy_workers", limit, minimum=1)
        self._lock = threading.Lock()
        self._busy = 0  # places taken, including those handed to a pool in line
        self._line: dict[int, BaseWorkerPool] = {}  # id(pool) -> pool, in order of arrival
        self._handed: dict[int, int] = {}  # id(pool) -> places handed to it, not taken yet

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def has_waiters(self) -> bool:
        return bool(self._line)

    def others_waiting(self, pool: BaseWorkerPool) -> bool:
        """Some pool other than ``pool`` waits for a place (a racy read: a hint)."""
        line = self._line
        return len(line) > (1 if id(pool) in line else 0)

    def counts(self) -> tuple[int | None, int, int]:
        """(limit, places taken, pools in line)."""
        with self._lock:
            return self._limit, self._busy, len(self._line)

    def take(self, pool: BaseWorkerPool) -> bool:
        """A place for one of ``pool``'s workers; False puts ``pool`` in line."""
        with self._lock:
            handed = self._handed.get(id(pool), 0)
            if handed:
                if handed == 1:
                    del self._handed[id(pool)]
                else:
                    self._handed[id(pool)] = handed - 1
                return True
            if self._limit is None or (self._busy < self._limit and not self._line):
                self._busy += 1
                return True
            self._line.setdefault(id(pool), pool)
            return False

    def give_back(self, pool: BaseWorkerPool, count: int = 1) -> list[BaseWorkerPool]:
        """``pool`` frees ``count`` places (and any handed to it but not taken).

        Returns the pools now handed a place: call `_place_granted` on each,
        with no lock held.
        """
        with self._lock:
            count += self._handed.pop(id(pool), 0)
            self._busy -= count
            return self._hand_out()

    def leave(self, pool: BaseWorkerPool) -> list[BaseWorkerPool]:
        """``pool`` needs no place any more (disposed): out of line, handed places back."""
        with self._lock:
            self._line.pop(id(pool), None)
            self._busy -= self._handed.pop(id(pool), 0)
            return self._hand_out()

    def _hand_out(self) -> list[BaseWorkerPool]:
        granted = []
        while self._line and (self._limit is None or self._busy < self._limit):
            key = next(iter(self._line))
            waiter = self._line.pop(key)
            self._handed[key] = self._handed.get(key, 0) + 1
            self._busy += 1
            granted.append(waiter)
        return granted
