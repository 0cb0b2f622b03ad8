"""The map methods ported from ``multiprocessing.Pool`` and mpire, on both local
engines: ``imap_unordered`` (results in completion order), ``starmap`` and
``starmap_unordered``, ``imap``; ``map`` of a ``functools.partial``; and the
``progress`` option (a description, or tqdm's keyword arguments) on each.

Completion order is forced, never raced: call 0 waits for a file that the
test makes only once it has taken the other results from the iterator.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pool_manager import (
    BaseWorkerPool,
    ResultTimeoutError,
    WorkerLostError,
    WorkerPool,
    WorkerPoolManager,
    as_completed,
)
from pool_manager._dispatch import LONG_TASK

from .doubles import RecordingBar, ThreadWorkerPool
from .helpers import (
    FakeClock,
    fail_at,
    poll,
    run_scripted,
    runs_per_call,
    square,
    wait_for_path,
)

STALE = 60.0
LIFETIME = 600.0
#: How long call 0 waits for its gate: if the map waited for it in order,
#: the test fails this long after it began (never hangs).
GATE_WAIT = 15.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["fork_server", "loky"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    return str(request.param)


def make_pool(engine: str, workers: int = 2, **options: Any) -> WorkerPool:
    if engine == "loky":
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool(workers, **options)
    return BaseWorkerPool(workers, **options)


# -- task functions (by reference, from this module) -----------------------------


def first_waits(gate: str, x: int) -> int:
    """``x * x``; call 0 first waits for ``gate`` (a file)."""
    if x == 0:
        wait_for_path(gate, GATE_WAIT)
    return x * x


def mark_then_wait(directory: str, gate: str, x: int) -> int:
    """Leave ``ran-<x>`` in ``directory``, then wait for ``gate``; returns ``x``."""
    Path(directory, f"ran-{x}").touch()
    wait_for_path(gate, GATE_WAIT)
    return x


def mark_first_long(directory: str, gate: str, x: int) -> int:
    """`mark_then_wait`, but call 0 returns after twice ``LONG_TASK``: this kind of
    task is long to the pool, which then hands a worker one at a time (none
    waits behind a running one, where it could no longer be cancelled)."""
    if x == 0:
        Path(directory, "ran-0").touch()
        time.sleep(2 * LONG_TASK)  # (how long the call is, not a wait for anything)
        return 0
    return mark_then_wait(directory, gate, x)


def power(base: int, *, exponent: int = 2, modulo: int | None = None) -> int:
    return pow(base, exponent, modulo)


def ran(directory: Path) -> set[int]:
    return {int(name.split("-")[1]) for name in os.listdir(directory) if name.startswith("ran-")}


# -- completion order --------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_unordered_yields_each_chunk_as_it_finishes(
    engine: str, chunksize: int, tmp_path: Path
) -> None:
    # Three tasks on two workers: call 0's task waits until the test has the
    # others' results, which an in-order map could never hand out first.
    gate = tmp_path / "gate"
    with make_pool(engine) as pool:
        results = pool.imap_unordered(
            functools.partial(first_waits, str(gate)), range(3 * chunksize), chunksize=chunksize
        )
        others = [next(results) for _ in range(2 * chunksize)]
        assert sorted(others) == [x * x for x in range(chunksize, 3 * chunksize)]
        gate.touch()
        assert list(results) == [x * x for x in range(chunksize)]  # (its chunk's own order)


def test_starmap_unordered_yields_in_completion_order(engine: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with make_pool(engine) as pool:
        results = pool.starmap_unordered(first_waits, [(str(gate), x) for x in range(3)])
        assert sorted([next(results), next(results)]) == [1, 4]
        gate.touch()
        assert list(results) == [0]


@pytest.mark.parametrize("chunksize", [None, 1, 7])
@pytest.mark.parametrize("sized", [True, False])
def test_imap_unordered_yields_every_result_once(engine: str, chunksize: int, sized: bool) -> None:
    items = range(500) if sized else (x for x in range(500))
    with make_pool(engine) as pool:
        results = list(pool.imap_unordered(square, items, chunksize=chunksize))
        assert sorted(results) == [x * x for x in range(500)]
        assert pool.unfinished_maps == 0


def test_an_unsized_input_is_read_a_bounded_window_ahead(engine: str) -> None:
    asked = 0

    def numbers() -> Iterator[int]:
        nonlocal asked
        for x in range(100_000):
            asked += 1
            yield x

    with make_pool(engine) as pool:
        results = pool.imap_unordered(square, numbers(), chunksize=1)
        window = asked  # what the call sent before anything was consumed
        assert 0 < window <= 16
        taken = [next(results) for _ in range(50)]
        # One more item read for each result handed out: the window stays put.
        assert asked == window + 50
        assert len(set(taken)) == 50
        results.close()


def test_closing_early_cancels_the_calls_not_started(engine: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with make_pool(engine) as pool:
        results = pool.imap_unordered(
            functools.partial(mark_first_long, str(tmp_path), str(gate)), range(20), chunksize=1
        )
        assert poll(lambda: {0, 1} <= ran(tmp_path), timeout=30)  # a call on each worker
        assert next(results) == 0  # the others wait for the gate
        results.close()
        assert pool.unfinished_maps == 0
        gate.touch()
    # Call 1 had started, and call 2 may have (call 0's worker took it on);
    # the other 17 never ran.
    assert {0, 1} <= ran(tmp_path) <= {0, 1, 2}
    assert pool.task_counts()["cancelled"] == 20 - len(ran(tmp_path))


def test_the_timeout_raises_and_cancels_the_calls_not_started(engine: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with make_pool(engine) as pool:
        results = pool.imap_unordered(
            functools.partial(mark_then_wait, str(tmp_path), str(gate)),
            range(8),
            chunksize=1,
            timeout=0.5,
        )
        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            next(results)
        assert time.monotonic() - started < GATE_WAIT  # (not the calls' own timeout)
        assert isinstance(caught.value, ResultTimeoutError)
        assert isinstance(caught.value, concurrent.futures.TimeoutError)
        # Two calls had started (a kind not yet measured goes one per worker).
        assert poll(lambda: len(ran(tmp_path)) == 2, timeout=30)
        gate.touch()
    assert len(ran(tmp_path)) == 2
    assert pool.task_counts()["cancelled"] == 6


def test_calls_cancelled_by_shutdown_come_out_as_they_are_cancelled(
    engine: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with make_pool(engine) as pool:
        results = pool.imap_unordered(
            functools.partial(mark_then_wait, str(tmp_path), str(gate)),
            range(4),
            chunksize=1,
            return_exceptions=True,
        )
        assert poll(lambda: len(ran(tmp_path)) == 2, timeout=30)  # calls 0 and 1 run
        pool.shutdown(wait=False, cancel_futures=True)
        cancelled = [next(results), next(results)]  # before the running calls end
        assert all(isinstance(c, concurrent.futures.CancelledError) for c in cancelled)
        gate.touch()
        assert sorted(results) == [0, 1]


def test_calls_a_lost_worker_took_from_a_chunk_run_again_and_come_out(tmp_path: Path) -> None:
    # With a deadline, the worker reports each call: the call that took it
    # down fails alone, and the chunk's calls after it go back in flight.
    actions = ("ok", "ok", "ok", "ok", "exit", "ok", "ok", "ok", "ok")
    step = functools.partial(run_scripted, str(tmp_path), actions)
    with BaseWorkerPool(1, task_timeout=30) as pool:
        outcomes = list(pool.imap_unordered(step, range(9), chunksize=9, return_exceptions=True))
    assert sorted(o for o in outcomes if isinstance(o, int)) == [0, 1, 2, 3, 5, 6, 7, 8]
    (lost,) = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(lost, WorkerLostError) and "exit code 3" in str(lost)
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(9), 1)


@pytest.mark.parametrize("chunksize", [None, 1, 2])
def test_return_exceptions_yields_each_failure_in_place_of_its_result(
    engine: str, chunksize: int | None
) -> None:
    calls = list(zip(range(6), [9, 1, 9, 3, 9, 9]))  # calls 1 and 3 raise
    with make_pool(engine) as pool:
        outcomes = list(
            pool.starmap_unordered(fail_at, calls, chunksize=chunksize, return_exceptions=True)
        )
        with pytest.raises(ValueError, match="bad item"):
            list(pool.starmap_unordered(fail_at, calls, chunksize=chunksize))
    assert sorted(o for o in outcomes if isinstance(o, int)) == [0, 2, 4, 5]
    errors = sorted(str(o) for o in outcomes if isinstance(o, BaseException))
    assert errors == ["bad item 1", "bad item 3"] and len(outcomes) == 6


# -- starmap, imap, partial ----------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 2])
def test_starmap_calls_fn_with_each_tuple_unpacked_in_order(
    engine: str, chunksize: int | None
) -> None:
    calls = [(2, 5), (3, 2), [10, 3], (7, 0)]  # a list is unpacked as a tuple is
    with make_pool(engine) as pool:
        assert list(pool.starmap(pow, calls, chunksize=chunksize)) == [32, 9, 1000, 1]
        unsized = ((x, 2) for x in range(30))
        assert list(pool.starmap(pow, unsized, chunksize=chunksize)) == [x * x for x in range(30)]
        assert list(pool.imap(abs, range(-5, 5), chunksize=chunksize)) == [
            abs(x) for x in range(-5, 5)
        ]
        assert list(pool.starmap(pow, [])) == []


def test_the_chunk_size_may_be_given_by_position_as_multiprocessing_takes_it(
    engine: str,
) -> None:
    with make_pool(engine) as pool:
        assert list(pool.imap(abs, range(-4, 4), 3)) == [abs(x) for x in range(-4, 4)]
        assert sorted(pool.imap_unordered(abs, range(-4, 4), 3)) == sorted(map(abs, range(-4, 4)))
        assert list(pool.starmap(pow, [(2, 3), (3, 2)], 1)) == [8, 9]
        assert sorted(pool.starmap_unordered(pow, [(2, 3), (3, 2)], 1)) == [8, 9]
        with pytest.raises(ValueError, match="chunksize"):
            pool.imap_unordered(abs, range(3), 0)


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_of_a_partial_fixes_keyword_arguments(engine: str, chunksize: int | None) -> None:
    cube = functools.partial(power, exponent=3)  # a function of this test module
    with make_pool(engine) as pool:
        assert list(pool.map(cube, range(5), chunksize=chunksize)) == [0, 1, 8, 27, 64]
        assert sorted(pool.imap_unordered(cube, range(5), chunksize=chunksize)) == [
            0,
            1,
            8,
            27,
            64,
        ]
        modulo = functools.partial(power, exponent=2, modulo=5)
        assert list(pool.starmap(modulo, [(3,), (4,)], chunksize=chunksize)) == [4, 1]
        assert list(pool.map(functools.partial(int, base=2), ["10", "11"])) == [2, 3]


# -- the manager ---------------------------------------------------------------------


def test_a_pool_under_an_unfinished_unordered_iterator_is_not_expired(engine: str) -> None:
    clock = FakeClock()
    with WorkerPoolManager(
        2, STALE, LIFETIME, clock=clock, memory_sample_interval=None, engine=engine
    ) as manager:
        with manager.lease("a", 2) as pool:
            results = pool.imap_unordered(square, (x for x in range(100)), chunksize=1)
            first = next(results)
        assert pool.unfinished_maps == 1
        assert poll(lambda: pool.unfinished_tasks == 0, timeout=30)
        for _ in range(3):
            clock.advance(STALE * 2)
            assert manager.sweep().expired == []
        assert "a" in manager
        assert sorted([first, *results]) == [x * x for x in range(100)]  # still served
        assert pool.unfinished_maps == 0
        clock.advance(STALE)
        assert manager.sweep().expired == []  # its next look sees the map ended: idle from now
        clock.advance(STALE)
        assert manager.sweep().expired == ["a"]


# -- progress bars -------------------------------------------------------------------


@pytest.fixture
def no_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    tqdm = pytest.importorskip("tqdm", reason="the progress extra (tqdm) is not installed")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # (tqdm's thread outlives its bars)


def test_progress_takes_tqdm_keyword_arguments_on_every_map_method(
    recorded: list[RecordingBar],
) -> None:
    options = {"desc": "tenant-a", "leave": False, "position": 1}
    with BaseWorkerPool(2) as pool:
        pool.name = "key"
        assert sorted(pool.imap_unordered(square, range(6), progress=options)) == [
            x * x for x in range(6)
        ]
        assert list(pool.starmap(pow, [(2, 2)] * 3, progress=options)) == [4, 4, 4]
        assert len(list(pool.starmap_unordered(pow, [(2, 2)] * 4, progress="powers"))) == 4
        assert list(pool.imap(abs, iter([-1, -2]), progress=True)) == [1, 2]
        assert list(pool.map(abs, [-1], progress={})) == [1]  # a dict, even empty, asks
        futures = [pool.submit(square, x) for x in range(3)]
        assert len(list(as_completed(futures, progress={"desc": "batch", "leave": False}))) == 3
    unordered, starmap, star_unordered, imap, empty, completed = recorded
    assert unordered.options == {**options, "total": 6, "unit": "item"}
    assert starmap.options == {**options, "total": 3, "unit": "item", "postfix": "in input order"}
    assert star_unordered.options == {"total": 4, "desc": "powers", "unit": "item"}
    assert imap.options == {
        "total": None,
        "desc": "key",
        "unit": "item",
        "postfix": "in input order",
    }
    assert empty.options["desc"] == "key"
    assert completed.options == {"total": 3, "desc": "batch", "unit": "task", "leave": False}
    assert [bar.n for bar in recorded] == [6, 3, 4, 2, 1, 3]
    assert all(bar.closed for bar in recorded)


def test_an_unordered_bar_counts_each_result_as_it_goes_out(
    recorded: list[RecordingBar], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(2) as pool:
        results = pool.imap_unordered(
            functools.partial(first_waits, str(gate)), range(3), chunksize=1, progress=True
        )
        (bar,) = recorded
        assert bar.n == 0
        next(results), next(results)
        assert bar.n == 2  # call 0 still runs: these are the first two to finish
        gate.touch()
        assert list(results) == [0]
    assert bar.n == 3 and bar.closed


def test_an_in_order_bar_says_it_counts_in_input_order(no_monitor: None) -> None:
    text, unordered_text = io.StringIO(), io.StringIO()
    with BaseWorkerPool(2) as pool:
        list(pool.map(square, range(5), progress={"file": text, "desc": "squares"}))
        list(pool.imap_unordered(square, range(5), progress={"file": unordered_text}))
    assert "squares" in text.getvalue() and "5/5" in text.getvalue()
    assert "in input order" in text.getvalue()
    assert "5/5" in unordered_text.getvalue()
    assert "in input order" not in unordered_text.getvalue()


def test_a_progress_option_of_the_wrong_kind_is_refused_before_anything_is_sent() -> None:
    with BaseWorkerPool(1) as pool:
        with pytest.raises(TypeError, match="progress must be"):
            pool.imap_unordered(square, range(3), progress=3)  # type: ignore[call-overload]
        assert pool.task_counts()["submitted"] == 0


# -- the base: a pool that defines only submit ----------------------------------------


def test_any_worker_pool_has_the_map_methods(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = ThreadWorkerPool()
    try:
        results = pool.imap_unordered(functools.partial(first_waits, str(gate)), range(3))
        assert sorted([next(results), next(results)]) == [1, 4]
        gate.touch()
        assert list(results) == [0]
        assert list(pool.starmap(pow, [(2, 3), (3, 2)])) == [8, 9]
        outcomes = list(pool.starmap_unordered(fail_at, [(1, 1), (2, 0)], return_exceptions=True))
        assert 2 in outcomes and [str(o) for o in outcomes if o != 2] == ["bad item 1"]
        assert list(pool.imap(abs, itertools.chain([-1], [-2]))) == [1, 2]
    finally:
        pool.dispose()
