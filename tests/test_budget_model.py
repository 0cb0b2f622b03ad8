"""The caps across keys as pure decision logic: property-based, stateful tests.

`WorkerBudget` (``max_total_workers``) and `BusySlots` (``max_busy_workers``)
are driven by stand-in pools that keep their side of the contract the way
`BaseWorkerPool` does (a worker per allowance, surplus workers shed as they
go idle, a place per busy worker), with no processes. Hypothesis draws the
events: submits, task finishes, worker exits, idle timeouts, disposals, and
changes that land while a plan is reading the pools (another thread's, in
the real thing). After every step the limits hold; at any point, finishing
the work without new submits must end with every task done (no lost
wake-up), in a bounded number of steps.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pool_manager.budget import (
    BudgetReport,
    BusySlots,
    PlacedPool,
    PlaceRules,
    WorkerBudget,
    _Account,
)

#: ``make stress`` runs more examples (``POOL_MANAGER_STRESS`` scales them).
SETTINGS = settings(
    max_examples=int(150 * float(os.environ.get("POOL_MANAGER_STRESS", "1"))),
    stateful_step_count=60,
    deadline=None,
)


class _Worker:
    __slots__ = ("busy", "leaving")

    def __init__(self) -> None:
        self.busy = False
        self.leaving = False


class _ModelPool:
    """A pool's side of the budget (`budget.BudgetedPool`), as `BaseWorkerPool`
    keeps it (no processes)."""

    def __init__(self, name: str, budget: WorkerBudget, want: int) -> None:
        self.name = name
        self.budget = budget
        self.want = want
        self.queued = 0
        self.workers: list[_Worker] = []
        self.allowed = 0
        self.last_submit = 0.0
        self.disposed = False
        #: Called once, the next time the budget reads this pool: another
        #: thread's change landing while a plan is in progress.
        self.on_read: Callable[[], None] | None = None
        budget.register(self)

    # What the budget calls.
    def budget_report(self) -> BudgetReport:
        report = BudgetReport(
            want=self.want,
            demand=min(self.want, self.unfinished),
            live=len(self.workers),
            active=len(self.active),
        )
        hook, self.on_read = self.on_read, None
        if hook is not None:
            hook()
        return report

    def apply_allowance(self) -> None:
        self.allowed = self.budget.allowed(self)
        self.dispatch()

    # Its own bookkeeping.
    @property
    def active(self) -> list[_Worker]:
        return [w for w in self.workers if not w.leaving]

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.busy)

    @property
    def unfinished(self) -> int:
        return self.queued + self.running

    def dispatch(self) -> None:
        """As `BaseWorkerPool._dispatch`: shed the surplus, then hand out the queue."""
        if self.disposed:
            return
        surplus = len(self.active) - self.allowed
        for worker in self.active:
            if surplus <= 0:
                break
            if not worker.busy:
                worker.leaving = True
                surplus -= 1
        for worker in self.active:
            if self.queued and not worker.busy and len(self.active) <= self.allowed:
                worker.busy = True
                self.queued -= 1
        while self.queued and len(self.active) < min(self.allowed, self.want):
            worker = _Worker()
            worker.busy = True
            self.workers.append(worker)
            self.queued -= 1

    def wants_workers(self) -> bool:
        active = len(self.active)
        return active >= self.allowed and active < min(self.want, self.unfinished)

    def submit(self) -> None:
        self.queued += 1
        self.dispatch()
        self.budget.submitted(self, self.wants_workers())

    def finish(self, worker: _Worker) -> None:
        worker.busy = False
        self.dispatch()
        self.budget.changed(self, went_idle=self.unfinished == 0, worker_ended=False)

    def exit(self, worker: _Worker) -> None:
        self.workers.remove(worker)
        self.dispatch()
        self.budget.changed(self, went_idle=False, worker_ended=True)

    def dispose(self) -> None:
        self.disposed = True
        self.budget.unregister(self)


class BudgetMachine(RuleBasedStateMachine):
    """`WorkerBudget` under random events, with stand-in pools."""

    @initialize(
        limit=st.integers(1, 6),
        wants=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    )
    def build(self, limit: int, wants: list[int]) -> None:
        self.limit = limit
        self.budget = WorkerBudget(limit)
        self.pools = [_ModelPool(f"p{i}", self.budget, want) for i, want in enumerate(wants)]

    @property
    def open_pools(self) -> list[_ModelPool]:
        return [p for p in self.pools if not p.disposed]

    @rule(data=st.data(), count=st.integers(1, 5))
    def submit(self, data: st.DataObject, count: int) -> None:
        if not self.open_pools:
            return
        pool = data.draw(st.sampled_from(self.open_pools))
        for _ in range(count):
            pool.submit()

    @rule(data=st.data())
    def finish_a_task(self, data: st.DataObject) -> None:
        busy = [(p, w) for p in self.pools for w in p.workers if w.busy]
        if busy:
            pool, worker = data.draw(st.sampled_from(busy))
            pool.finish(worker)

    @rule(data=st.data())
    def a_leaving_worker_exits(self, data: st.DataObject) -> None:
        leaving = [(p, w) for p in self.pools for w in p.workers if w.leaving and not w.busy]
        if leaving:
            pool, worker = data.draw(st.sampled_from(leaving))
            pool.exit(worker)

    @rule(data=st.data())
    def an_idle_worker_times_out(self, data: st.DataObject) -> None:
        idle = [(p, w) for p in self.pools for w in p.active if not w.busy]
        if idle:
            pool, worker = data.draw(st.sampled_from(idle))
            worker.leaving = True
            pool.exit(worker)

    @rule(data=st.data())
    def a_change_lands_during_the_next_plan(self, data: st.DataObject) -> None:
        """While the next rebalance reads pool A, a task of pool B finishes (or B submits)."""
        if not self.open_pools:
            return
        reader = data.draw(st.sampled_from(self.open_pools))
        other = data.draw(st.sampled_from(self.pools))
        finish = data.draw(st.booleans())

        def change() -> None:
            busy = [w for w in other.workers if w.busy]
            if finish and busy:
                other.finish(busy[0])
            elif not other.disposed:
                other.submit()

        reader.on_read = change

    @rule()
    def rebalance(self) -> None:
        self.budget.rebalance()

    @rule()
    def a_supervisor_sweep(self) -> None:
        self.budget.sweep()  # (plans only if one may change anything)

    @precondition(lambda self: len(self.open_pools) > 1)
    @rule(data=st.data())
    def dispose_an_idle_pool(self, data: st.DataObject) -> None:
        idle = [p for p in self.open_pools if p.unfinished == 0 and not p.workers]
        if idle:
            data.draw(st.sampled_from(idle)).dispose()

    @invariant()
    def allowances_never_exceed_the_limit(self) -> None:
        allowed = [self.budget.allowed(p) for p in self.pools]
        assert sum(allowed) <= self.limit, allowed

    @invariant()
    def a_pool_never_runs_more_than_it_may(self) -> None:
        for pool in self.open_pools:
            assert len(pool.active) <= pool.want
            # Above its allowance only with busy workers (they leave when idle).
            assert len(pool.active) - pool.allowed <= pool.running, pool.name

    @invariant()
    def live_workers_never_exceed_the_limit_but_for_those_leaving(self) -> None:
        live = sum(len(p.workers) for p in self.pools)
        leaving = sum(1 for p in self.pools for w in p.workers if w.leaving)
        surplus = sum(max(0, len(p.active) - p.allowed) for p in self.pools)
        assert live <= self.limit + leaving + surplus

    @invariant()
    def no_pool_has_queued_work_and_an_unused_place(self) -> None:
        free = self.limit - sum(max(p.allowed, len(p.workers)) for p in self.pools)
        for pool in self.open_pools:
            if pool.queued and len(pool.active) < min(pool.want, pool.unfinished):
                # Short of workers: the budget has nothing left to give it now.
                assert pool.allowed <= len(pool.active) and free <= 0, (pool.name, free)

    @invariant()
    def every_task_finishes_without_new_submits(self) -> None:
        """Liveness, on a copy of the world: drain it, step by step."""
        steps = 0
        pools = self.open_pools
        # Events are applied to the real objects: drain only at the end of a
        # run would miss lost wake-ups mid-run, so drain a snapshot instead.
        snapshot = _snapshot(self.budget, pools)
        try:
            while any(p.unfinished for p in pools) or any(
                w.leaving for p in pools for w in p.workers
            ):
                steps += 1
                assert steps < 500, [(p.name, p.queued, p.running, p.allowed) for p in pools]
                if _exit_a_leaving_worker(pools):
                    continue
                busy = [(p, w) for p in pools for w in p.workers if w.busy]
                assert busy, (
                    "work queued, no worker running, none leaving: a lost wake-up",
                    [(p.name, p.queued, len(p.workers), p.allowed) for p in pools],
                )
                pool, worker = busy[steps % len(busy)]
                pool.finish(worker)
        finally:
            _restore(self.budget, pools, snapshot)

    @invariant()
    def every_waiting_pool_is_served_while_the_others_flood(self) -> None:
        """Fairness, on a copy of the world: each pool with tasks queued runs one
        of them within a bounded number of steps, while every pool that has
        run one keeps submitting a new task for each task it finishes."""
        pools = self.open_pools
        snapshot = _snapshot(self.budget, pools)
        try:
            waiting = {id(p): p.queued for p in pools if p.queued}
            started: dict[_Worker, int] = {}  # worker -> the step its task was first seen
            steps = 0
            while waiting:
                steps += 1
                assert steps < 500, [(p.name, p.queued, p.running, p.allowed) for p in pools]
                if not _exit_a_leaving_worker(pools):
                    busy = [(p, w) for p in pools for w in p.workers if w.busy]
                    assert busy, "work queued, no worker running, none leaving: a lost wake-up"
                    for _, w in busy:
                        started.setdefault(w, steps)
                    # The task running longest finishes first: each ends in turn.
                    pool, worker = min(busy, key=lambda pw: started[pw[1]])
                    del started[worker]
                    pool.finish(worker)
                    if id(pool) not in waiting:
                        pool.submit()  # the flood goes on
                for p in pools:
                    if id(p) in waiting and p.queued < waiting[id(p)]:
                        del waiting[id(p)]  # a task of its started
        finally:
            _restore(self.budget, pools, snapshot)


def _exit_a_leaving_worker(pools: list[_ModelPool]) -> bool:
    """One step of a drain: an idle worker told to leave exits (False: none is)."""
    for pool in pools:
        for worker in pool.workers:
            if worker.leaving and not worker.busy:
                pool.exit(worker)
                return True
    return False


#: The budget's accounts, its published counts, and each pool's queue, allowance,
#: pending hook and workers (with their state).
_Snapshot = tuple[
    dict[int, _Account],
    tuple[int, int, int, int, bool],
    dict[int, tuple[int, int, Callable[[], None] | None, list[tuple[_Worker, bool, bool]]]],
]


def _snapshot(budget: WorkerBudget, pools: list[_ModelPool]) -> _Snapshot:
    accounts = {key: copy.copy(account) for key, account in budget._accounts.items()}
    state = (
        budget._waiting,
        budget._short,
        budget._in_use,
        budget._generation,
        budget._unplanned,
    )
    workers = {
        id(p): (p.queued, p.allowed, p.on_read, [(w, w.busy, w.leaving) for w in p.workers])
        for p in pools
    }
    return accounts, state, workers


def _restore(budget: WorkerBudget, pools: list[_ModelPool], snapshot: _Snapshot) -> None:
    accounts, state, workers = snapshot
    budget._accounts = accounts
    (
        budget._waiting,
        budget._short,
        budget._in_use,
        budget._generation,
        budget._unplanned,
    ) = state
    for pool in pools:
        queued, allowed, on_read, kept = workers[id(pool)]
        pool.queued, pool.allowed, pool.on_read = queued, allowed, on_read
        pool.workers = []
        for worker, busy, leaving in kept:
            worker.busy, worker.leaving = busy, leaving
            pool.workers.append(worker)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = SETTINGS


def test_a_free_place_goes_to_a_waiting_pool_not_to_one_whose_busy_worker_holds_one() -> None:
    # Found by the machine above: pools p0 and p2 ran a worker each above
    # their allowance (busy, due to leave when idle); raising their
    # allowance back costs no place, yet the plan counted each raise against
    # the one free place, and p5 (queued work, no worker) was left waiting
    # beside it.
    budget = WorkerBudget(5)
    pools = [_ModelPool(f"p{i}", budget, want) for i, want in enumerate([1, 2, 2, 1, 2, 1])]
    p0, p1, p2, p3, p4, p5 = pools

    def busy_worker(pool: _ModelPool) -> _Worker:
        return next(w for w in pool.workers if w.busy)

    p0.submit()
    for pool, count in ((p2, 2), (p1, 3)):
        for _ in range(count):
            pool.submit()
    p3.dispose()
    for _ in range(2):
        p4.submit()
    worker = busy_worker(p1)
    p1.finish(worker)
    p1.exit(worker)
    worker = busy_worker(p2)
    p2.finish(worker)
    p2.submit()
    p5.submit()
    assert worker.leaving and not worker.busy
    p2.exit(worker)
    # No pool waits with work beside a free place.
    free = 5 - sum(max(p.allowed, len(p.workers)) for p in pools if not p.disposed)
    waiting = [
        p.name
        for p in pools
        if not p.disposed and p.queued and len(p.active) < min(p.want, p.unfinished)
    ]
    assert not (waiting and free > 0), (waiting, free)


def test_a_place_freed_by_taking_back_unused_allowance_goes_to_a_waiting_pool() -> None:
    """Found by `BudgetMachine`: rule 2 took from a pool above its fair share an
    allowance it did not use (more allowed than live workers), so a place came
    free at once, and the plan left it free while a pool waited with work."""
    budget = WorkerBudget(6)
    pools = [_ModelPool(f"p{i}", budget, want) for i, want in enumerate([1, 3, 1, 4, 1, 3])]
    accounts = list(budget._accounts.values())
    # (allowed, demand, live, waiting since, held since), as the plan found them.
    found = [(0, 1, 0, 29, 17), (1, 1, 1, None, 20), (0, 0, 0, None, 0)]
    found += [(1, 2, 2, 27, 12), (0, 1, 1, 23, 3), (0, 1, 1, 25, 11)]
    for pool, account, (allowed, demand, live, waiting, held) in zip(pools, accounts, found):
        account.allowed, account.demand, account.want, account.live = (
            allowed,
            demand,
            pool.want,
            live,
        )
        account.waiting_since, account.held_since, account.last_used = waiting, held, account.order
    budget._ticket = itertools.count(32)
    budget._plan(accounts)
    free = 6 - sum(max(a.allowed, a.live) for a in accounts)
    assert (accounts[0].allowed, free) == (1, 0)


# -- BusySlots ------------------------------------------------------------------


class _PlacePool:
    """A pool's side of `BusySlots` (`budget.PlacedPool`): a place per busy worker, as
    `BaseWorkerPool` keeps it."""

    def __init__(self, name: str, slots: BusySlots, size: int) -> None:
        self.name = name
        self.slots = slots
        self.size = size
        self.queued = 0
        self.running = 0  # workers running a task, each holding a place
        self.granted_calls = 0

    def place_granted(self) -> None:
        self.granted_calls += 1
        self.dispatch()

    def dispatch(self) -> None:
        while self.queued and self.running < self.size and self.slots.take(self):
            self.queued -= 1
            self.running += 1
        # Places handed to it and not taken go back (as _return_places does).
        _grant(self.slots.give_back(self, 0))

    def submit(self, count: int) -> None:
        self.queued += count
        self.dispatch()

    def finish(self) -> None:
        # Its worker keeps its place for the next queued task, or gives it back.
        if self.queued:
            self.queued -= 1
            return
        self.running -= 1
        _grant(self.slots.give_back(self, 1))


def _grant(pools: list[PlacedPool]) -> None:
    for pool in pools:
        pool.place_granted()


class PlacesMachine(RuleBasedStateMachine):
    @initialize(limit=st.integers(1, 4), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
    def build(self, limit: int, sizes: list[int]) -> None:
        self.limit = limit
        self.slots = BusySlots(limit)
        self.pools = [_PlacePool(f"p{i}", self.slots, size) for i, size in enumerate(sizes)]

    @rule(data=st.data(), count=st.integers(1, 4))
    def submit(self, data: st.DataObject, count: int) -> None:
        data.draw(st.sampled_from(self.pools)).submit(count)

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        running = [p for p in self.pools if p.running]
        if running:
            data.draw(st.sampled_from(running)).finish()

    @invariant()
    def places_never_exceed_the_limit(self) -> None:
        limit, busy, _ = self.slots.counts()
        assert busy <= self.limit == limit
        assert sum(p.running for p in self.pools) == busy

    @invariant()
    def no_pool_waits_while_a_place_is_free(self) -> None:
        _, busy, waiting = self.slots.counts()
        queued = [p for p in self.pools if p.queued and p.running < p.size]
        if queued:
            assert busy == self.limit, (busy, [(p.name, p.queued, p.running) for p in queued])
        if waiting:
            assert busy == self.limit

    @invariant()
    def all_work_finishes(self) -> None:
        # The places are plain counts: drain a copy by replaying on fresh objects.
        slots = BusySlots(self.limit)
        pools = [_PlacePool(p.name, slots, p.size) for p in self.pools]
        for pool, real in zip(pools, self.pools):
            pool.submit(real.queued + real.running)
        steps = 0
        while any(p.queued or p.running for p in pools):
            steps += 1
            assert steps < 500
            running = [p for p in pools if p.running]
            assert running, "work queued and no place in use: a lost wake-up"
            running[steps % len(running)].finish()


TestPlacesMachine = PlacesMachine.TestCase
TestPlacesMachine.settings = SETTINGS


# -- the time slices (PlaceRules), and when a place goes back -----------------------


class _Holder:
    """A worker as the busy-place policy reads it (`budget.PlaceHolder`)."""

    def __init__(self, holds_place: bool, place_since: float, assigned: int) -> None:
        self.holds_place = holds_place
        self.place_since = place_since
        self.assigned = [object()] * assigned


@given(
    others_waiting=st.booleans(),
    holds_place=st.booleans(),
    held_for=st.floats(0, 1),
    assigned=st.integers(0, 3),
    more_coming=st.booleans(),
)
def test_place_rules(
    others_waiting: bool, holds_place: bool, held_for: float, assigned: int, more_coming: bool
) -> None:
    quantum = 0.04
    worker = _Holder(holds_place, 100.0 - held_for, assigned)
    rules = PlaceRules(others_waiting, 100.0, quantum)
    slice_over = held_for >= quantum
    # An idle worker's place goes to the line once its slice is over, if another pool waits.
    gives_up = holds_place and not assigned and others_waiting and slice_over
    assert rules.slice_over([worker]) == ([worker] if gives_up else [])
    # A busy worker takes more only with a place, and within its slice while another waits.
    assert rules.may_hand_more(worker) == (holds_place and (not others_waiting or not slice_over))
    # With no more work on its way, an idle worker's place goes back, waiting pools or not.
    released = holds_place and not assigned and not more_coming
    assert BusySlots.places_to_release([worker], more_coming) == ([worker] if released else [])


class _CountedPool(_ModelPool):
    """A model pool that counts the plans that read it."""

    def __init__(self, name: str, budget: WorkerBudget, want: int) -> None:
        super().__init__(name, budget, want)
        self.reads = 0

    def budget_report(self) -> BudgetReport:
        self.reads += 1
        return super().budget_report()


def _a_full_budget_and_a_submit_it_left_unplanned() -> tuple[
    WorkerBudget, _CountedPool, _CountedPool
]:
    """Pools a and b hold one place each of two; then a submits a second task:
    it could use a second worker, the budget is full, so the submit does not plan."""
    budget = WorkerBudget(2)
    a, b = _CountedPool("a", budget, 2), _CountedPool("b", budget, 2)
    a.submit()
    b.submit()
    assert (a.allowed, a.running, b.allowed, b.running) == (1, 1, 1, 1)
    reads = a.reads
    a.submit()
    assert a.reads == reads and a.queued == 1
    return budget, a, b


def test_a_sweep_plans_only_when_a_plan_may_change_something() -> None:
    budget = WorkerBudget(2)
    a = _CountedPool("a", budget, 2)
    a.submit()
    a.submit()
    for worker in list(a.workers):
        a.finish(worker)  # (a is idle: nothing waits, nobody is short)
    reads = a.reads
    budget.sweep()
    assert a.reads == reads  # the last plan stands: a sweep does not plan for nothing

    budget, a, b = _a_full_budget_and_a_submit_it_left_unplanned()
    reads = a.reads
    budget.sweep()
    assert a.reads == reads + 1  # the submit left unplanned is planned now
    reads = a.reads
    budget.sweep()
    assert a.reads == reads + 1  # (a is short: the sweeps go on planning)


def test_a_finish_serves_a_submit_the_full_budget_left_unplanned() -> None:
    # No sweep: b's task finishes (b goes idle), and that plans for a, which
    # takes b's unused place once b's idle worker has left.
    budget, a, b = _a_full_budget_and_a_submit_it_left_unplanned()
    b.finish(b.workers[0])
    while _exit_a_leaving_worker([a, b]):
        pass
    assert (a.allowed, a.running, a.queued) == (2, 2, 0)
