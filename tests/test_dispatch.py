"""The pool's dispatch decisions, as pure functions (no workers)."""

from __future__ import annotations

import functools

from hypothesis import given
from hypothesis import strategies as st

from pool_manager._dispatch import (
    LONG_TASK,
    MAX_DEPTH,
    MAX_TASK_KINDS,
    PREFETCH_SECONDS,
    RunTimes,
    batch_size,
    task_kind,
)
from pool_manager._worker import run_chunk, run_chunk_single

from .helpers import add, square


def test_tasks_of_one_function_are_one_kind_for_the_run_time_estimate() -> None:
    assert task_kind(square, (1,)) == task_kind(square, (2,))
    assert task_kind(functools.partial(add, 1), ()) == task_kind(add, ())
    assert task_kind(square, ()) != task_kind(add, ())
    # map's chunks are a kind of their own per mapped function
    assert task_kind(run_chunk, (square, [])) != task_kind(square, ())
    assert task_kind(run_chunk, (square, [])) == task_kind(run_chunk, (square, [1]))
    assert task_kind(run_chunk_single, (square, [])) == task_kind(run_chunk, (square, []))
    assert task_kind(run_chunk, (square, [])) != task_kind(run_chunk, (add, []))


def test_callables_without_code_are_kinds_by_identity_or_by_type() -> None:
    assert task_kind(len, ()) is len  # a builtin: itself
    unhashable = type("Unhashable", (), {"__call__": lambda self: 0, "__hash__": None})()
    assert task_kind(unhashable, ()) is type(unhashable)


def test_an_unknown_kind_and_a_long_one_go_one_at_a_time() -> None:
    times = RunTimes()
    assert times.get("k") is None and times.depth("k") == 1
    times.observe("k", LONG_TASK * 2)
    assert times.depth("k") == 1


def test_short_tasks_are_prefetched_to_cover_the_prefetch_window() -> None:
    times = RunTimes()
    times.observe("k", PREFETCH_SECONDS / 4)
    assert times.depth("k") == 5  # the one running, and 2 ms more
    times.observe("tiny", 1e-9)
    assert times.depth("tiny") == MAX_DEPTH


def test_the_average_follows_new_measures_and_old_kinds_are_forgotten() -> None:
    times = RunTimes()
    times.observe("k", 1.0)
    times.observe("k", 0.0)
    assert times.get("k") == 0.8  # a new measure weighs a fifth
    for kind in range(MAX_TASK_KINDS):
        times.observe(kind, 0.001)
    assert len(times) == MAX_TASK_KINDS and times.get("k") is None  # the oldest went


@given(
    room=st.integers(0, 200),
    queued=st.integers(0, 10_000),
    workers=st.integers(0, 100),
)
def test_a_batch_is_at_least_one_task_and_never_more_than_room_share_or_depth(
    room: int, queued: int, workers: int
) -> None:
    size = batch_size(room, queued, workers)
    assert 1 <= size <= MAX_DEPTH
    if room >= 1:
        assert size <= room
    if queued >= 1:
        # No more than a fair share of the queue among the workers.
        assert size <= -(-queued // max(1, workers))


@given(times=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=50))
def test_depth_is_between_one_and_max_depth_and_shorter_tasks_never_get_less(
    times: list[float],
) -> None:
    run_times = RunTimes()
    for seconds in times:
        run_times.observe("k", seconds)
    average = run_times.get("k")
    assert average is not None and min(times) - 1e-9 <= average <= max(times) + 1e-9
    depth = run_times.depth("k")
    assert 1 <= depth <= MAX_DEPTH
    shorter = RunTimes()
    shorter.observe("k", average / 2)
    assert shorter.depth("k") >= depth
