"""The machine-wide caps (``max_total_workers``, ``max_busy_workers``) and their fairness.

Real workers, gated on files (no sleeps); the rule itself is also checked
without processes, on stand-in pools.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import pool_manager._places as places_module
from pool_manager import WorkerPoolManager
from pool_manager.budget import (
    DEFAULT_WORKERS_PER_CPU,
    MIN_DEFAULT_WORKERS,
    BudgetReport,
    WorkerBudget,
    default_busy_limit,
    default_limit,
)

from .helpers import getpid, poll, square, touch_and_wait, wait_then_square


def _manager(engine: str = "fork_server", /, **options: Any) -> WorkerPoolManager:
    options.setdefault("memory_sample_interval", None)
    options.setdefault("max_busy_workers", None)  # (its own tests set it)
    return WorkerPoolManager(2, 60, 600, engine=engine, **options)


@pytest.fixture(params=["fork_server", "loky"])
def engine(request: pytest.FixtureRequest) -> str:
    """Each engine's pools keep both caps (a loky pool's workers are its slots)."""
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    return str(request.param)


class _Sampler:
    """Reads ``stats()`` every few milliseconds; keeps the highest live, in-use and busy."""

    def __init__(self, manager: WorkerPoolManager) -> None:
        self.manager = manager
        self.highest = 0
        self.highest_in_use = 0
        self.highest_busy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.003):
            stats = self.manager.stats()
            self.highest = max(self.highest, stats["total_workers"])
            self.highest_in_use = max(self.highest_in_use, stats["budget"]["in_use"])
            self.highest_busy = max(self.highest_busy, stats["budget"]["busy"])

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_live_workers_across_keys_never_exceed_the_budget(tmp_path: Path, engine: str) -> None:
    with _manager(engine, max_total_workers=2) as manager, _Sampler(manager) as sampler:
        for key in ("a", "b", "c"):
            started, gate = tmp_path / f"{key}.started", tmp_path / f"{key}.gate"
            with manager.lease(key, 2) as pool:
                future = pool.submit(touch_and_wait, str(started), str(gate))
                assert poll(started.exists, timeout=30)
                assert manager.stats()["total_workers"] <= 2
                gate.touch()
                assert future.result(timeout=30) in pool.worker_pids()
            assert poll(lambda: manager.stats()["total_workers"] <= 2, timeout=30)
            assert manager.stats()["budget"]["in_use"] <= 2
        # Three keys each used a worker; only two ever lived at once.
        assert sampler.highest <= 2
        assert sampler.highest_in_use <= 2
        stats = manager.stats()
        assert stats["budget"]["limit"] == 2 and stats["budget"]["waiting"] == 0


def test_a_pool_takes_the_least_recently_used_idle_worker(tmp_path: Path, engine: str) -> None:
    with _manager(engine, max_total_workers=2) as manager:
        with manager.lease("old") as old:
            old_pid = old.submit(getpid).result(timeout=30)
        with manager.lease("recent") as recent:
            recent_pid = recent.submit(getpid).result(timeout=30)
        assert manager.stats()["total_workers"] == 2  # the budget is full, both idle
        with manager.lease("new") as new:
            new_pid = new.submit(getpid).result(timeout=30)
        assert new_pid not in (old_pid, recent_pid)
        # The worker of "old", used least recently, left; "recent" kept its own.
        assert poll(lambda: old.worker_pids() == [], timeout=30)
        assert recent.worker_pids() == [recent_pid]
        assert manager.stats()["total_workers"] == 2


def test_one_key_flooding_does_not_starve_another(tmp_path: Path, engine: str) -> None:
    first_gate, backlog_gate = tmp_path / "first", tmp_path / "backlog"
    with _manager(engine, max_total_workers=2, max_pending=None) as manager:
        a, done_a = manager.get_pool("A", 2)
        b, done_b = manager.get_pool("B", 1)
        try:
            # A floods: its first two tasks hold both workers (the whole
            # budget), and its backlog waits behind them.
            started = [tmp_path / f"started-{i}" for i in range(2)]
            firsts = [a.submit(touch_and_wait, str(s), str(first_gate)) for s in started]
            backlog = [a.submit(wait_then_square, str(backlog_gate), i) for i in range(2, 30)]
            assert poll(lambda: all(s.exists() for s in started), timeout=30)
            assert len(a.worker_pids()) == 2

            b_done_with_a_unfinished: list[int] = []
            b_future = b.submit(square, 7)
            b_future.add_done_callback(
                lambda _: b_done_with_a_unfinished.append(a.unfinished_tasks)
            )
            assert manager.stats()["budget"]["waiting"] == 1  # B, until A gives a worker back
            first_gate.touch()  # A's workers finish their task; one of them leaves for B
            assert b_future.result(timeout=30) == 49
            # B ran while A's backlog (gated until now) was not done. (A's
            # second first task, let go by the same gate, may finish a moment
            # after B's: 28 or 29 unfinished.)
            # (Its done-callback runs on a callback thread, a moment after.)
            assert poll(lambda: b_done_with_a_unfinished, timeout=30)
            assert b_done_with_a_unfinished[0] >= 28
            assert manager.stats()["total_workers"] <= 2
            backlog_gate.touch()
            assert [f.result(timeout=30) for f in backlog] == [i * i for i in range(2, 30)]
            assert all(isinstance(f.result(timeout=30), int) for f in firsts)
            assert a.task_counts()["completed"] == 30
        finally:
            # (Open both gates whatever failed: shutdown waits for the work.)
            first_gate.touch()
            backlog_gate.touch()
            done_a()
            done_b()


def test_no_cap_with_none(tmp_path: Path, engine: str) -> None:
    gate = tmp_path / "gate"
    with _manager(engine, max_total_workers=None) as manager:
        assert manager.max_total_workers is None
        leases = [manager.get_pool(key, 2) for key in "abc"]
        futures: list[Future[int]] = []
        for index, (pool, _) in enumerate(leases):
            for worker in range(2):
                started = tmp_path / f"started-{index}-{worker}"
                futures.append(pool.submit(touch_and_wait, str(started), str(gate)))
        try:
            # Six tasks run at once: three keys of two workers, no budget.
            assert poll(lambda: len(list(tmp_path.glob("started-*"))) == 6, timeout=60)
            assert manager.stats()["total_workers"] == 6
            assert manager.stats()["budget"]["limit"] is None
        finally:
            gate.touch()
            for future in futures:
                future.result(timeout=30)
            for _, done in leases:
                done()


def test_default_and_bad_values() -> None:
    with WorkerPoolManager(2, 60, 600, memory_sample_interval=None) as manager:
        assert manager.max_total_workers == default_limit()
        assert default_limit() >= max(MIN_DEFAULT_WORKERS, DEFAULT_WORKERS_PER_CPU)
        assert manager.max_busy_workers == default_busy_limit() >= 1
    # A default never holds a lone key's pool below its pool_size.
    big = default_limit() + 1
    with WorkerPoolManager(big, 60, 600, memory_sample_interval=None) as manager:
        assert manager.max_total_workers == big
        assert manager.max_busy_workers == big
    for option in ("max_total_workers", "max_busy_workers"):
        for bad in (0, -1):
            with pytest.raises(ValueError):
                _manager(**{option: bad})
        for wrong in (1.5, "2", True):
            with pytest.raises(TypeError):
                _manager(**{option: wrong})


# -- max_busy_workers: how many run at once -------------------------------------


def test_busy_workers_across_keys_never_exceed_max_busy_workers(
    tmp_path: Path, engine: str
) -> None:
    gate = tmp_path / "gate"
    with _manager(engine, max_total_workers=None, max_busy_workers=2) as manager:
        leases = [manager.get_pool(key, 2) for key in "abc"]
        futures: list[Future[int]] = []
        with _Sampler(manager) as sampler:
            try:
                for index, (pool, _) in enumerate(leases):
                    for worker in range(2):
                        started = tmp_path / f"started-{index}-{worker}"
                        futures.append(pool.submit(touch_and_wait, str(started), str(gate)))
                # Six tasks that could run at once, but two places: two run.
                assert poll(lambda: len(list(tmp_path.glob("started-*"))) == 2, timeout=60)
                budget = manager.stats()["budget"]
                assert budget["busy"] == 2 and budget["busy_limit"] == 2
                assert budget["busy_waiting"] >= 1
                assert len(list(tmp_path.glob("started-*"))) == 2
            finally:
                gate.touch()
                results = [future.result(timeout=60) for future in futures]
                for _, done in leases:
                    done()
        assert len(results) == 6 and len(list(tmp_path.glob("started-*"))) == 6
        assert sampler.highest_busy <= 2
        assert manager.stats()["budget"]["busy"] == 0


def test_a_key_flooding_does_not_starve_another_of_a_place_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    # A's first tasks last as long as the test likes; their time slice is
    # taken as over when they end (a slice of 0), so no timing is involved.
    monkeypatch.setattr(places_module, "BUSY_QUANTUM", 0.0)
    first_gate, backlog_gate = tmp_path / "first", tmp_path / "backlog"
    with _manager(engine, max_total_workers=None, max_busy_workers=2, max_pending=None) as manager:
        a, done_a = manager.get_pool("A", 2)
        b, done_b = manager.get_pool("B", 1)
        try:
            # A floods: its first two tasks take both places, its backlog waits.
            started = [tmp_path / f"started-{i}" for i in range(2)]
            firsts = [a.submit(touch_and_wait, str(s), str(first_gate)) for s in started]
            backlog = [a.submit(wait_then_square, str(backlog_gate), i) for i in range(2, 30)]
            assert poll(lambda: all(s.exists() for s in started), timeout=30)

            b_done_with_a_unfinished: list[int] = []
            b_future = b.submit(square, 7)
            b_future.add_done_callback(
                lambda _: b_done_with_a_unfinished.append(a.unfinished_tasks)
            )
            assert manager.stats()["budget"]["busy_waiting"] == 1  # B
            first_gate.touch()  # A's workers finish; a place goes to B, not to A's backlog
            assert b_future.result(timeout=30) == 49
            assert poll(lambda: b_done_with_a_unfinished, timeout=30)
            assert b_done_with_a_unfinished[0] >= 27
            backlog_gate.touch()
            assert [f.result(timeout=30) for f in backlog] == [i * i for i in range(2, 30)]
            assert all(isinstance(f.result(timeout=30), int) for f in firsts)
        finally:
            first_gate.touch()
            backlog_gate.touch()
            done_a()
            done_b()


@pytest.fixture
def long_time_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A place's time slice that never runs out during the test (no timing)."""
    monkeypatch.setattr(places_module, "BUSY_QUANTUM", 3600.0)


@pytest.mark.usefixtures("long_time_slice")
def test_a_busy_worker_within_its_slice_is_handed_more_while_its_sibling_waits(
    tmp_path: Path,
) -> None:
    gate_b, gate_a = tmp_path / "gate-b", tmp_path / "gate-a"
    with _manager(max_total_workers=None, max_busy_workers=2, max_pending=None) as manager:
        a, done_a = manager.get_pool("A", 2)
        b, done_b = manager.get_pool("B", 1)
        c, done_c = manager.get_pool("C", 1)
        try:
            # A starts both its workers and learns that `square` is short.
            warm = [tmp_path / f"warm-{i}" for i in range(2)]
            opened = tmp_path / "warm-gate"
            both = [a.submit(touch_and_wait, str(w), str(opened)) for w in warm]
            assert poll(lambda: all(w.exists() for w in warm), timeout=30)
            opened.touch()
            assert len({f.result(timeout=30) for f in both}) == 2  # two workers
            warmed = [a.submit(square, i) for i in range(20)]
            assert [f.result(timeout=30) for f in warmed] == [i * i for i in range(20)]
            # B and A take the two places; C waits in line.
            b_task = b.submit(touch_and_wait, str(tmp_path / "b"), str(gate_b))
            assert poll(lambda: (tmp_path / "b").exists(), timeout=30)
            a_task = a.submit(touch_and_wait, str(tmp_path / "a"), str(gate_a))
            assert poll(lambda: (tmp_path / "a").exists(), timeout=30)
            c_task = c.submit(square, 3)
            assert poll(lambda: manager.stats()["budget"]["busy_waiting"] == 1, timeout=30)
            # A's idle worker finds no place, yet its busy one (in its slice)
            # is handed A's short tasks ahead, so none wait in A's queue.
            shorts = [a.submit(square, i) for i in range(40)]
            with a._lock:  # type: ignore[attr-defined]
                queued = len(a._pending)  # type: ignore[attr-defined]
            assert queued == 0
            gate_a.touch()
            assert [f.result(timeout=30) for f in shorts] == [i * i for i in range(40)]
            assert not c_task.done()  # A kept its place through its slice
            gate_b.touch()
            assert c_task.result(timeout=30) == 9
            assert a_task.result(timeout=30) and b_task.result(timeout=30)
        finally:
            gate_a.touch()
            gate_b.touch()
            done_a()
            done_b()
            done_c()


@pytest.mark.usefixtures("long_time_slice")
def test_a_pool_keeps_its_place_while_backpressure_holds_its_next_task(
    tmp_path: Path, engine: str
) -> None:
    gate_c, gate_a = tmp_path / "gate-c", tmp_path / "gate-a"
    with _manager(engine, max_total_workers=None, max_busy_workers=1, max_pending=0) as manager:
        a, done_a = manager.get_pool("A", 1)
        c, done_c = manager.get_pool("C", 1)
        try:
            first = a.submit(touch_and_wait, str(tmp_path / "a"), str(gate_a))
            assert poll(lambda: (tmp_path / "a").exists(), timeout=30)
            c_task = c.submit(touch_and_wait, str(tmp_path / "c"), str(gate_c))
            assert poll(lambda: manager.stats()["budget"]["busy_waiting"] == 1, timeout=30)
            # A's second submit blocks (one worker, max_pending=0) until the
            # first task ends; its place waits for it instead of going to C.
            second: list[Future[int]] = []
            submitter = threading.Thread(target=lambda: second.append(a.submit(square, 5)))
            submitter.start()
            assert poll(lambda: a._blocked_submits == 1, timeout=30)  # type: ignore[attr-defined]
            gate_a.touch()
            submitter.join(timeout=30)
            assert second and second[0].result(timeout=30) == 25
            assert first.result(timeout=30) and not (tmp_path / "c").exists()
            gate_c.touch()
            assert c_task.result(timeout=30)
        finally:
            gate_a.touch()
            gate_c.touch()
            done_a()
            done_c()


# -- the rule, on stand-in pools (no processes) --------------------------------


class _StandIn:
    """What the budget reads from and tells a pool (`budget.BudgetedPool`), with no
    workers behind it."""

    def __init__(self, budget: WorkerBudget, demand: int) -> None:
        self.budget = budget
        self.demand = demand
        self.live = 0
        self.told = 0  # times the budget told it to take its allowance
        self.last_submit = 0.0
        budget.register(self)

    @property
    def allowed(self) -> int:
        return self.budget.allowed(self)

    def budget_report(self) -> BudgetReport:
        return BudgetReport(want=self.demand, demand=self.demand, live=self.live, active=self.live)

    def apply_allowance(self) -> None:
        self.told += 1

    def settle(self) -> None:
        """Its workers match its allowance (the leaving ones have left)."""
        self.live = self.allowed


@pytest.fixture
def budget() -> Iterator[WorkerBudget]:
    yield WorkerBudget(2)


def test_rule_a_pool_above_its_fair_share_gives_a_worker_back(budget: WorkerBudget) -> None:
    flood = _StandIn(budget, demand=2)
    budget.rebalance()
    flood.settle()
    assert flood.allowed == 2
    single = _StandIn(budget, demand=1)
    told = flood.told
    budget.rebalance()
    # The flood's allowance drops to its fair share (told: one of its workers
    # leaves once idle), and the place goes to the single task then.
    assert flood.allowed == 1 and flood.told == told + 1
    assert single.allowed == 0 and budget.stats()["waiting"] == 1
    assert budget.stats()["in_use"] == 2
    flood.settle()
    budget.rebalance()
    assert single.allowed == 1 and budget.stats()["waiting"] == 0


def test_rule_more_busy_pools_than_workers_take_turns() -> None:
    budget = WorkerBudget(1)
    pools = [_StandIn(budget, demand=5) for _ in range(3)]
    turns: list[int] = []
    for _ in range(12):  # each step: a rebalance, then the workers start or leave
        budget.rebalance()
        assert sum(pool.allowed for pool in pools) <= 1
        assert budget.stats()["in_use"] <= 1
        for pool in pools:
            pool.settle()
        holders = [i for i, pool in enumerate(pools) if pool.allowed]
        if holders and (not turns or turns[-1] != holders[0]):
            turns.append(holders[0])
    # The one worker went round the three pools, in turn.
    assert turns[:4] == [0, 1, 2, 0]
