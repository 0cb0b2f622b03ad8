"""Shared data per pool (``shared_data=``, ``_shared.py``): one object for
every worker of a pool, pickled once in the parent, its large buffers in
memfd segments the pool (or the manager) holds, mapped read-only by each
worker with its ``INIT`` and loaded once, before the initializer.
"""

from __future__ import annotations

import gc
import pickle
import threading
from typing import Any

import psutil
import pytest

from pool_manager import (
    BaseWorkerPool,
    WorkerPoolBrokenError,
    WorkerPoolManager,
    _buffers,
    _pool_dispatch,
    shared_data,
)
from pool_manager._protocol import BUFFER_THRESHOLD

from .helpers import (
    LoadsBadly,
    initializer_saw,
    memfds,
    peak_growth,
    poll,
    remember_shared_sum,
    shared_buffer_info,
    shared_data_flags,
    shared_data_lookup_error,
    shared_dict_summary,
    shared_sum,
    shared_sum_and_pid,
    square,
    write_to_shared_data,
)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(90)

#: Enough float64 elements to pass the out-of-band threshold a few times over.
LARGE = 4 * BUFFER_THRESHOLD // 8


@pytest.fixture
def array() -> Any:
    return np.arange(LARGE, dtype=np.float64)


# -- tasks and the initializer read it ---------------------------------------------


def test_tasks_read_the_shared_array_written_once(array: Any) -> None:
    written = _buffers.segments_written
    with BaseWorkerPool(2, shared_data=array) as pool:
        assert _buffers.segments_written == written + 1  # (at construction)
        futures = [pool.submit(shared_sum_and_pid, i) for i in range(8)]
        results = [f.result(timeout=60) for f in futures]
        assert [total for total, _ in results] == [float(array.sum())] * 8
        assert {pid for _, pid in results} <= set(pool.worker_pids())
        assert _buffers.segments_written == written + 1  # (the tasks took no copy)


def test_the_shared_array_is_a_read_only_view_in_the_worker(array: Any) -> None:
    with BaseWorkerPool(1, shared_data=array) as pool:
        writeable, owns_data, _ = pool.submit(shared_data_flags).result(timeout=60)
        assert (writeable, owns_data) == (False, False)  # (a view of the mapping, no copy)
        with pytest.raises(ValueError, match="read-only"):
            pool.submit(write_to_shared_data).result(timeout=60)
        assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())


def test_the_initializer_sees_the_shared_data(array: Any) -> None:
    with BaseWorkerPool(1, initializer=remember_shared_sum, shared_data=array) as pool:
        assert pool.submit(initializer_saw).result(timeout=60) == float(array.sum())


def test_replaced_workers_still_see_it(array: Any) -> None:
    with BaseWorkerPool(2, max_tasks_per_worker=1, shared_data=array) as pool:
        results = [pool.submit(shared_sum_and_pid).result(timeout=60) for _ in range(5)]
    assert [total for total, _ in results] == [float(array.sum())] * 5
    assert len({pid for _, pid in results}) == 5  # (a new worker each time)


def test_a_dict_of_arrays_and_small_values(array: Any) -> None:
    table = {"name": "prices", "a": array, "b": np.ones(LARGE)}
    written = _buffers.segments_written
    with BaseWorkerPool(1, shared_data=table) as pool:
        assert _buffers.segments_written == written + 2
        assert pool.submit(shared_dict_summary).result(timeout=60) == (
            "prices",
            float(array.sum()),
            float(LARGE),
        )


def test_a_pickle_buffer_arrives_as_a_read_only_view() -> None:
    data = bytes(range(256)) * (2 * BUFFER_THRESHOLD // 256)
    with BaseWorkerPool(1, shared_data=pickle.PickleBuffer(data)) as pool:
        assert pool.submit(shared_buffer_info).result(timeout=60) == (
            "memoryview",
            True,
            len(data),
            0,
        )


def test_small_shared_data_travels_in_the_pickle() -> None:
    written = _buffers.segments_written
    with BaseWorkerPool(1, shared_data=np.arange(10.0)) as pool:
        assert pool.submit(shared_sum).result(timeout=60) == 45.0
    assert _buffers.segments_written == written


# -- where there is none --------------------------------------------------------------


def test_shared_data_outside_a_worker_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match="not one"):
        shared_data()


def test_a_worker_of_a_pool_without_shared_data_raises_lookup_error() -> None:
    with BaseWorkerPool(1) as pool:
        assert "has no shared data" in pool.submit(shared_data_lookup_error).result(timeout=60)
        with pytest.raises(LookupError):
            pool.submit(shared_data).result(timeout=60)


# -- failures ---------------------------------------------------------------------------


def test_unpicklable_shared_data_raises_type_error_at_construction() -> None:
    before = memfds()
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        BaseWorkerPool(1, shared_data=threading.Lock())
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        WorkerPoolManager(1, 60, 3600, shared_data=threading.Lock(), handle_signals=False)
    assert memfds() == before


def test_shared_data_that_fails_to_load_in_the_worker_fails_the_tasks() -> None:
    with (
        BaseWorkerPool(1, shared_data=LoadsBadly()) as pool,
        pytest.raises(WorkerPoolBrokenError, match="could not set themselves up") as caught,
    ):
        pool.submit(square, 2).result(timeout=60)
    assert "this shared data cannot be loaded here" in str(caught.value)


def test_an_init_whose_segments_cannot_be_passed_fails_like_a_setup(
    array: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (As test_buffers' test of a task's descriptors: a descriptor that is
    # not open fails the same way as ETOOMANYREFS.)
    monkeypatch.setattr(
        _pool_dispatch, "descriptors_message", lambda fds: _buffers.descriptors_message([-1])
    )
    with (
        BaseWorkerPool(1, shared_data=array) as pool,
        pytest.raises(WorkerPoolBrokenError, match="shared data could not be passed"),
    ):
        pool.submit(square, 2).result(timeout=60)


# -- lifetime ---------------------------------------------------------------------------


def test_the_segments_close_when_the_pool_is_shut_down(array: Any) -> None:
    before = memfds()
    pool = BaseWorkerPool(1, shared_data=array)
    assert memfds() == before + 1
    assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
    pool.shutdown(wait=True)
    assert memfds() == before  # (not waiting for the pool to be collected)


def test_the_segments_close_when_a_pool_is_dropped_without_shutdown(array: Any) -> None:
    before = memfds()
    pool = BaseWorkerPool(1, shared_data=array)
    assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
    del pool
    gc.collect()
    assert poll(lambda: memfds() == before, 15.0, 0.02)


def test_pools_given_the_same_array_share_its_segment(array: Any) -> None:
    written = _buffers.segments_written
    with (
        BaseWorkerPool(1, shared_data=array) as first,
        BaseWorkerPool(1, shared_data=array) as second,
    ):
        assert _buffers.segments_written == written + 1
        assert first.submit(shared_sum).result(timeout=60) == float(array.sum())
        assert second.submit(shared_sum).result(timeout=60) == float(array.sum())


def test_a_manager_shares_one_set_of_segments_among_its_pools(array: Any) -> None:
    before, written = memfds(), _buffers.segments_written
    with WorkerPoolManager(
        2, 600, 3600, shared_data=array, memory_sample_interval=None, handle_signals=False
    ) as manager:
        for key in ("a", "b"):
            with manager.lease(key) as pool:
                assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
        assert len(manager) == 2
        assert memfds() == before + 1
        assert _buffers.segments_written == written + 1
    assert memfds() == before  # (the manager is shut down and its pools are gone)


# -- memory: shared, not copied ------------------------------------------------------------


def shared_mappings(pid: int) -> list[Any]:
    """A worker's mappings of segments (psutil's, one per mapping)."""
    maps = psutil.Process(pid).memory_maps(grouped=False)
    return [m for m in maps if "pool_manager-buffer" in m.path]


def test_a_100_mb_array_read_by_40_tasks_in_4_workers_is_shared_not_copied() -> None:
    size = 100_000_000
    whole: list[int] = []
    pool_part: list[int] = []
    with peak_growth(whole):
        array = np.random.default_rng(0).random(size // 8)
        expected = float(array.sum())
        with (
            peak_growth(pool_part),
            BaseWorkerPool(4, initializer=remember_shared_sum, shared_data=array) as pool,
        ):
            futures = [pool.submit(shared_sum_and_pid, i) for i in range(40)]
            results = [f.result(timeout=60) for f in futures]
            ran = sorted({pid for _, pid in results})
            memory = {pid: psutil.Process(pid).memory_full_info() for pid in ran}
            mapped = {pid: shared_mappings(pid) for pid in ran}
    assert [total for total, _ in results] == [expected] * 40
    # The parent: the array, and little more (an in-band pickle per worker,
    # or a copy per task, would add at least the array again).
    assert whole[0] < 1.5 * size
    assert pool_part[0] < 0.25 * size
    # The workers (each read the whole array in its initializer, and in tasks):
    assert len(ran) >= 2
    for pid in ran:
        # none has a copy of its own ...
        assert memory[pid].uss < 0.5 * size, (pid, memory[pid])
        # ... each read it through the shared mapping ...
        assert sum(m.rss for m in mapped[pid]) >= 0.9 * size, (pid, mapped[pid])
    # ... whose pages are counted once among them, not once each.
    assert sum(m.pss for maps in mapped.values() for m in maps) < 1.1 * size
