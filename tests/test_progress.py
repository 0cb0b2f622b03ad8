"""Progress bars: ``map(..., progress=...)`` and ``pool_manager.as_completed``.

Two ways: with tqdm itself (its text on stderr), and with a stand-in
``tqdm.auto`` module that records what the library asked of the bar.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

import pytest

from pool_manager import (
    BaseWorkerPool,
    ResultTimeoutError,
    WorkerPoolManager,
    as_completed,
)

from .doubles import ThreadWorkerPool
from .helpers import fail_at, square

P = ParamSpec("P")
T = TypeVar("T")


def test_map_progress_counts_every_item_and_names_the_key(recorded: list[Any]) -> None:
    with WorkerPoolManager(2, 60, 600) as manager, manager.lease("tenant-7", 2) as pool:
        assert list(pool.map(square, range(50), progress=True)) == [i * i for i in range(50)]
        assert list(pool.map(square, range(5), chunksize=2, progress="squares")) == [
            0,
            1,
            4,
            9,
            16,
        ]
    first, second = recorded
    assert (first.total, first.desc, first.unit, first.n, first.closed) == (
        50,
        "tenant-7",
        "item",
        50,
        True,
    )
    assert (second.desc, second.n, second.closed) == ("squares", 5, True)


def test_map_progress_on_an_input_without_a_length_has_no_total(recorded: list[Any]) -> None:
    with BaseWorkerPool(1) as pool:
        assert sum(pool.map(square, (i for i in range(20)), progress=True)) == sum(
            i * i for i in range(20)
        )
    (bar,) = recorded
    assert bar.total is None and bar.n == 20 and bar.desc is None


def test_a_map_left_early_closes_its_bar(recorded: list[Any]) -> None:
    with BaseWorkerPool(1) as pool:
        results = pool.map(square, range(100), chunksize=1, progress=True)
        assert next(results) == 0
        results.close()  # the caller stops iterating
    (bar,) = recorded
    assert bar.n == 1 and bar.closed


def test_as_completed_with_progress(recorded: list[Any]) -> None:
    with BaseWorkerPool(2) as pool:
        futures = [pool.submit(square, i) for i in range(12)]
        done = list(as_completed(futures, timeout=30, progress="batch"))
    assert set(done) == set(futures)
    (bar,) = recorded
    assert (bar.total, bar.desc, bar.unit, bar.n, bar.closed) == (12, "batch", "task", 12, True)


def test_as_completed_without_progress_needs_no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with BaseWorkerPool(1) as pool:
        futures = [pool.submit(square, i) for i in range(4)]
        assert sorted(f.result() for f in as_completed(futures, timeout=30)) == [0, 1, 4, 9]


@pytest.mark.parametrize("progress", [False, "batch"])
def test_an_as_completed_timeout_is_caught_as_either_timeout_error_on_every_version(
    progress: bool | str, recorded: list[Any]
) -> None:
    # A future nobody completes: on 3.10 concurrent.futures.TimeoutError is not
    # the builtin TimeoutError, and code written for either must catch it.
    never: Future[int] = Future()
    finished: Future[int] = Future()
    finished.set_result(1)
    results = as_completed([finished, never], timeout=0.05, progress=progress)
    assert next(results) is finished
    with pytest.raises(concurrent.futures.TimeoutError) as caught:
        next(results)
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, ResultTimeoutError)
    assert "1 (of 2) futures unfinished" in str(caught.value)


def test_asking_for_progress_without_tqdm_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if not installed
    with BaseWorkerPool(1) as pool:
        with pytest.raises(ModuleNotFoundError, match=r"pool-manager\[progress\]"):
            pool.map(square, range(3), progress=True)
        assert pool.task_counts()["submitted"] == 0  # nothing was sent
        future = pool.submit(square, 2)
        with pytest.raises(ModuleNotFoundError, match=r"pool-manager\[progress\]"):
            as_completed([future], progress=True)
        assert future.result(timeout=30) == 4


def test_the_real_tqdm_draws_the_bar_on_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tqdm = pytest.importorskip("tqdm", reason="the progress extra (tqdm) is not installed")
    # tqdm's own monitor thread outlives the bar (it is tqdm's, for the
    # process); the leak check would count it, so it is not started here.
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    with WorkerPoolManager(1, 60, 600) as manager, manager.lease("invoices") as pool:
        assert list(pool.map(square, range(8), progress=True)) == [i * i for i in range(8)]
    err = capsys.readouterr().err
    assert "invoices" in err and "8/8" in err


@pytest.mark.timeout(60)
def test_any_worker_pool_maps_with_return_exceptions() -> None:
    pool = ThreadWorkerPool()
    try:
        results = list(pool.map(fail_at, range(5), [9, 1, 9, 3, 9], return_exceptions=True))
        assert results[0] == 0 and results[2] == 2 and results[4] == 4
        assert [str(results[1]), str(results[3])] == ["bad item 1", "bad item 3"]
        assert list(pool.map(square, range(3), return_exceptions=True)) == [0, 1, 4]
    finally:
        pool.dispose()


def test_any_worker_pool_maps_with_progress_and_runs_awaitables(recorded: list[Any]) -> None:
    pool = ThreadWorkerPool()
    pool.name = "custom"
    try:
        assert list(pool.map(square, range(6), progress=True)) == [i * i for i in range(6)]
        assert asyncio.run(pool.run(square, 9)) == 81  # submitted on a thread (may block)
    finally:
        pool.dispose()
    (bar,) = recorded
    assert (bar.total, bar.desc, bar.n, bar.closed) == (6, "custom", 6, True)
