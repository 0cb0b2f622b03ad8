"""``map`` call by call: ``task_timeout`` is each call's, inside chunks too, and
``return_exceptions`` yields every call's outcome.

Scripted runs use `run_step`, which leaves a mark per call, so a test can
tell which calls ran, and how many times.
"""

from __future__ import annotations

import functools
import itertools
import pickle
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from pool_manager import (
    BaseWorkerPool,
    ResultUnpicklingError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
    _worker,
)
from pool_manager._map import _chunk_outcomes
from pool_manager._protocol import STARTED, CallFailed, dump_error, dump_result

from .helpers import (
    LoadsNowhere,
    run_scripted,
    runs_per_call,
    sleep_then_square,
    wait_for_path,
)


def scripted_map(
    pool: BaseWorkerPool, directory: Path, actions: list[str], shape: str, **options: Any
) -> Iterator[Any]:
    """``pool.map`` of `run_step` over ``actions`` (call ``x`` does ``actions[x]``),
    as one iterable (``"single"``), two (``"pairs"``), or a generator
    (``"unsized"``: chunks sized as measured)."""
    calls = range(len(actions))
    if shape == "pairs":
        return pool.map(
            run_scripted,
            itertools.repeat(str(directory)),
            itertools.repeat(tuple(actions)),
            calls,
            **options,
        )
    step = functools.partial(run_scripted, str(directory), tuple(actions))
    return pool.map(step, calls if shape == "single" else iter(calls), **options)


# -- task_timeout is each call's -------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["single", "pairs"])
def test_a_chunk_longer_than_task_timeout_succeeds_when_each_call_is_within_it(
    tmp_path: Path, shape: str
) -> None:
    # Chunks of ten 0.2 s calls (2 s each) under a 1 s deadline: each call
    # has the whole deadline, so none fails.
    with BaseWorkerPool(2, task_timeout=1) as pool:
        results = scripted_map(pool, tmp_path, ["sleep"] * 20, shape, chunksize=10)
        assert list(results) == list(range(20))
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(20), 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["single", "pairs"])
def test_the_call_past_task_timeout_fails_alone_after_the_results_before_it_in_its_chunk(
    tmp_path: Path, shape: str
) -> None:
    # Call 3 holds the GIL in C code: only the pool, from outside, can stop
    # it, and the results before it must already have left the worker.
    actions = ["ok", "ok", "ok", "hang", "ok", "ok"]
    with BaseWorkerPool(1, task_timeout=1) as pool:
        got = []
        with pytest.raises(TaskTimeoutError) as caught:
            for result in scripted_map(pool, tmp_path, actions, shape, chunksize=6):
                got.append(result)
        assert got == [0, 1, 2]
        assert caught.value.timeout == 1 and "ran past its 1s deadline" in str(caught.value)
        assert pool.submit(abs, -5).result(timeout=60) == 5  # the pool carries on
    # Nothing ran twice; the map raised, so what was left of the chunk did not run.
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(4), 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["single", "pairs", "unsized"])
def test_with_return_exceptions_the_call_past_task_timeout_yields_its_error_and_the_rest_run(
    tmp_path: Path, shape: str
) -> None:
    actions = ["ok"] * 5 + ["hang"] + ["ok"] * 6
    chunking = {} if shape == "unsized" else {"chunksize": 12}
    with BaseWorkerPool(1, task_timeout=1) as pool:
        results = list(
            scripted_map(pool, tmp_path, actions, shape, return_exceptions=True, **chunking)
        )
    assert results[:5] == [0, 1, 2, 3, 4] and results[6:] == list(range(6, 12))
    assert isinstance(results[5], TaskTimeoutError) and results[5].timeout == 1
    # The calls after it ran again in a new task; none of the others twice.
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(12), 1)


@pytest.mark.timeout(120)
def test_each_call_that_finishes_as_its_deadline_passes_either_returns_or_times_out() -> None:
    # Each call races its own deadline: it returns its result, or fails with
    # TaskTimeoutError (or, if it finished as its worker was ended, runs
    # again), nothing else; every call has one outcome, in order.
    seconds = [0.09 + 0.0025 * (x % 9) for x in range(36)]
    with BaseWorkerPool(2, task_timeout=0.1) as pool:
        results = list(
            pool.map(sleep_then_square, range(36), seconds, chunksize=6, return_exceptions=True)
        )
        assert pool.submit(abs, -1).result(timeout=60) == 1
    assert len(results) == 36
    for x, result in enumerate(results):
        assert result == x * x or isinstance(result, TaskTimeoutError), (x, result)


@pytest.mark.timeout(120)
def test_with_a_deadline_a_call_past_kill_worker_memory_fails_alone(tmp_path: Path) -> None:
    actions = ["ok", "ok", "hog", "ok", "ok"]
    with BaseWorkerPool(1, task_timeout=60, kill_worker_memory="200MB") as pool:
        results = list(
            scripted_map(pool, tmp_path, actions, "single", chunksize=5, return_exceptions=True)
        )
    assert results[:2] == [0, 1] and results[3:] == [3, 4]
    assert isinstance(results[2], WorkerMemoryError) and results[2].size > 200_000_000
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(5), 1)


# -- return_exceptions -------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task_timeout", [None, 30])
@pytest.mark.parametrize(
    ("shape", "chunksize"),
    [("single", None), ("single", 1), ("single", 4), ("pairs", 4), ("unsized", None)],
)
def test_return_exceptions_yields_every_calls_outcome_in_order(
    tmp_path: Path, task_timeout: float | None, shape: str, chunksize: int | None
) -> None:
    actions = ["ok"] * 40
    for x in (0, 7, 8, 21, 39):
        actions[x] = "raise"
    actions[13] = "unpicklable"
    with BaseWorkerPool(2, task_timeout=task_timeout) as pool:
        results = list(
            scripted_map(
                pool, tmp_path, actions, shape, chunksize=chunksize, return_exceptions=True
            )
        )
    assert len(results) == 40
    for x, result in enumerate(results):
        if actions[x] == "raise":
            assert isinstance(result, ValueError) and str(result) == f"call {x} raised"
            assert "run_step" in str(result.__cause__)  # the worker's traceback
        elif actions[x] == "unpicklable":
            # Described, not lost (nor the results of the calls around it).
            assert isinstance(result, RuntimeError)
            assert "UnpicklableError: call 13" in str(result)
            assert "could not be pickled" in str(result)
        else:
            assert result == x
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(40), 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task_timeout", [None, 30])
def test_a_result_that_cannot_be_pickled_is_its_calls_error_in_a_chunk_with_a_deadline(
    tmp_path: Path, task_timeout: float | None
) -> None:
    # With a deadline each result travels alone, so it fails alone; without,
    # the chunk's results travel together and fail together.
    actions = ["ok", "lock", "ok", "ok"]
    with BaseWorkerPool(1, task_timeout=task_timeout) as pool:
        results = list(
            scripted_map(pool, tmp_path, actions, "single", chunksize=2, return_exceptions=True)
        )
    assert results[2:] == [2, 3]
    assert isinstance(results[1], TypeError) and "lock" in str(results[1])
    if task_timeout is None:
        assert results[0] is results[1]
    else:
        assert results[0] == 0
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(4), 1)


@pytest.mark.timeout(120)
def test_without_a_deadline_a_worker_that_dies_in_a_chunk_takes_every_call_of_it(
    tmp_path: Path,
) -> None:
    # Its results travel in one message, at its end: none had left the worker.
    actions = ["ok", "ok", "ok", "ok", "exit", "ok", "ok", "ok", "ok"]
    with BaseWorkerPool(1) as pool:
        results = list(
            scripted_map(pool, tmp_path, actions, "single", chunksize=3, return_exceptions=True)
        )
    assert results[:3] == [0, 1, 2] and results[6:] == [6, 7, 8]
    lost = results[3:6]
    assert all(isinstance(error, WorkerLostError) for error in lost)
    assert "exit code 3" in str(lost[0])
    assert runs_per_call(str(tmp_path)) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 6: 1, 7: 1, 8: 1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["single", "pairs"])
def test_with_a_deadline_a_worker_that_dies_in_a_chunk_takes_only_its_call(
    tmp_path: Path, shape: str
) -> None:
    actions = ["ok", "ok", "ok", "ok", "exit", "ok", "ok", "ok", "ok"]
    (tmp_path / "raised").mkdir()
    with BaseWorkerPool(1, task_timeout=30) as pool:
        results = list(
            scripted_map(pool, tmp_path, actions, shape, chunksize=9, return_exceptions=True)
        )
        got = []
        with pytest.raises(WorkerLostError):  # without return_exceptions: raised after them
            for result in scripted_map(pool, tmp_path / "raised", actions, shape, chunksize=9):
                got.append(result)
        assert got == [0, 1, 2, 3]
    assert results[:4] == [0, 1, 2, 3] and results[5:] == [5, 6, 7, 8]
    assert isinstance(results[4], WorkerLostError) and "exit code 3" in str(results[4])
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(9), 1)
    assert runs_per_call(str(tmp_path / "raised")) == dict.fromkeys(range(5), 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_the_map_timeout_still_raises_with_return_exceptions(
    tmp_path: Path, chunksize: int
) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(1) as pool:
        results = pool.map(
            wait_for_path,
            [str(gate)] * 4,
            timeout=0.2,
            chunksize=chunksize,
            return_exceptions=True,
        )
        with pytest.raises(TimeoutError, match="not ready within its timeout"):
            next(results)
        gate.touch()


# -- the parts, without processes ----------------------------------------------------


class _ChunkFuture(Future[Any]):
    """A chunk's future as a pool's task with a deadline leaves it."""

    def __init__(self, reports: list[bytes], lost: bool = False, late: bool = False) -> None:
        super().__init__()
        self.reports = reports
        self.lost_with_worker = lost
        self.reported_late = late


def test_a_report_read_after_the_pool_ended_the_worker_runs_the_rest_again_and_fails_none() -> None:
    # The call that ran out its deadline finished as the worker was ended:
    # it keeps its result, and the one that had only just started runs again.
    error = TaskTimeoutError("late", pid=1, timeout=1.0)
    future = _ChunkFuture([dump_result(10), dump_result(11)], lost=True, late=True)
    for catch in (False, True):
        outcome = _chunk_outcomes(False, error, future, ["a", "b", "c", "d"], catch)
        assert outcome == ([10, 11], None, ["c", "d"])


def test_a_lost_call_fails_alone_and_the_calls_after_it_run_again_with_return_exceptions() -> None:
    error = TaskTimeoutError("over", pid=1, timeout=1.0)
    future = _ChunkFuture([dump_result(10)], lost=True)
    assert _chunk_outcomes(False, error, future, ["a", "b", "c"], True) == (
        [10, error],
        None,
        ["c"],
    )
    # Without: the map raises after the results before it.
    assert _chunk_outcomes(False, error, future, ["a", "b", "c"], False) == ([10], error, None)
    # The last call of its chunk: nothing to run again.
    assert _chunk_outcomes(False, error, future, ["a", "b"], True).rerun is None


def test_a_chunk_that_failed_as_a_whole_yields_its_error_for_each_call_without_a_result() -> None:
    error = RuntimeError("terminated")
    reported = _ChunkFuture([dump_result(10)])  # not lost with its worker: no re-run
    assert _chunk_outcomes(False, error, reported, ["a", "b", "c"], True) == (
        [10, error, error],
        None,
        None,
    )
    unreported: Future[Any] = Future()  # no deadline: no reports
    assert _chunk_outcomes(False, error, unreported, ["a", "b"], True).results == [error, error]


def test_a_report_that_does_not_unpickle_is_that_calls_error() -> None:
    unloadable = pickle.dumps(LoadsNowhere("no"))
    future = _ChunkFuture([dump_result(1), unloadable, dump_result(3)])
    results, failure, _ = _chunk_outcomes(True, [4], future, ["a", "b", "c", "d"], True)
    assert results[0] == 1 and results[2:] == [3, 4] and failure is None
    assert isinstance(results[1], ResultUnpicklingError)
    results, failure, _ = _chunk_outcomes(True, [4], future, ["a", "b", "c", "d"], False)
    assert results == [1] and isinstance(failure, ResultUnpicklingError)


def test_a_failed_call_in_place_is_loaded_with_the_workers_traceback() -> None:
    try:
        raise KeyError("k")
    except KeyError as error:
        failed = CallFailed(dump_error(error))
    results = _chunk_outcomes(True, [1, failed, 3], Future(), [0, 1, 2], True).results
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], KeyError) and "test_a_failed_call" in str(results[1].__cause__)


def _double(x: int) -> int:
    return 2 * x


def test_a_chunk_without_a_deadline_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_send(*args: object, **kwargs: object) -> None:
        raise AssertionError("a chunk without a deadline sent a message")

    monkeypatch.setattr(_worker, "_send", no_send)
    assert _worker.run_chunk_single(_double, [1, 2, 3]) == [2, 4, 6]
    assert _worker.run_chunk(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
    with_failure = _worker.run_chunk_single(lambda x: 1 // x, [1, 0, 2], True)
    assert with_failure[0] == 1 and with_failure[2] == 0
    assert isinstance(with_failure[1], CallFailed)


def test_a_chunk_with_a_deadline_reports_each_call_with_the_previous_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[tuple[int, object, int, float]] = []

    def send(kind: int, body: bytes = b"", reason: int = 0, task_id: int = 0, value: float = 0.0):  # type: ignore[no-untyped-def]
        sent.append((kind, pickle.loads(body), task_id, value))

    monkeypatch.setattr(_worker, "_send", send)
    monkeypatch.setattr(_worker, "_deadline", (7, 1.5))
    # The first call's start is the task's (sent before it runs); the answer
    # holds only the last call's result.
    assert _worker.run_chunk_single(_double, [1, 2, 3]) == [6]
    assert sent == [(STARTED, 2, 7, 1.5), (STARTED, 4, 7, 1.5)]
    sent.clear()
    with pytest.raises(ZeroDivisionError):  # raised: every result before it was reported
        _worker.run_chunk(divmod, [(7, 2), (1, 0), (9, 4)])
    assert sent == [(STARTED, (3, 1), 7, 1.5)]
    sent.clear()
    caught = _worker.run_chunk_single(lambda x: 1 // x, [1, 0, 2], True)
    assert caught == [0] and sent[0][1] == 1 and isinstance(sent[1][1], CallFailed)
