"""Shared arrays (``pool_manager.shared_array``, ``_shared_array.py``): a numpy
array made in a memfd from the start, which a pool sends to its workers as
its own segment: nothing written, no content check, the job's memory one
array however many tasks read it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from pool_manager import BaseWorkerPool, WorkerPoolManager, _buffers, shared_array
from pool_manager._protocol import BUFFER_THRESHOLD

from .helpers import (
    add_one_and_sum,
    echo,
    memfds,
    numpy_imported_pid,
    poll,
    shared_data_flags,
    shared_sum,
    sum_after,
    sum_and_memfd_mappings,
)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(90)

#: Enough float64 elements to pass the out-of-band threshold a few times over.
LARGE = 4 * BUFFER_THRESHOLD // 8
#: The descriptors one shared array holds open in this process: its own, and
#: before Python 3.13 the mapping's duplicate.
DESCRIPTORS = 1 if sys.version_info >= (3, 13) else 2
ARRAY_MEMFD = "pool_manager-shared-array"
COPY_MEMFD = "pool_manager-buffer"


def freed(before: int) -> bool:
    gc.collect()
    return bool(poll(lambda: memfds() == before, 15.0, 0.02))


@pytest.fixture
def pool() -> Any:
    pool = BaseWorkerPool(2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def counting() -> Any:
    """A shared array of `LARGE` float64 elements, 0, 1, 2, ...

    (Made in the test, not by a fixture: pytest holds a fixture's value
    until after the leak check, which would find its descriptor open.)
    """
    array = shared_array(LARGE)
    array[:] = np.arange(LARGE)
    return array


# -- what it makes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "order"),
    [
        (LARGE, float, "C"),
        ((1024, 300), np.int32, "C"),
        ((1024, 300), np.float32, "F"),
        ((7,), np.complex128, "C"),
        ([3, 4, 5], [("a", "i4"), ("b", "f8")], "C"),
    ],
    ids=["1d", "2d-int32", "fortran", "small", "structured"],
)
def test_a_shared_array_is_writable_zeros_of_its_shape_dtype_and_order(
    shape: Any, dtype: Any, order: Any
) -> None:
    before = memfds()
    made = shared_array(shape, dtype, order=order)
    expected = np.zeros(shape, dtype, order=order)
    assert made.shape == expected.shape and made.dtype == expected.dtype
    assert made.flags.f_contiguous == expected.flags.f_contiguous
    assert made.flags.c_contiguous == expected.flags.c_contiguous
    assert made.flags.writeable
    assert made.tobytes() == expected.tobytes()  # (zeros)
    made[(0,) * made.ndim] = made[(0,) * made.ndim]  # (writable in place)
    assert memfds() == before + DESCRIPTORS  # (its memory is a memfd of its own)
    del made
    assert memfds() == before


def test_the_default_dtype_is_float64() -> None:
    assert shared_array((2, 3)).dtype == np.float64


def test_an_array_of_no_elements_is_an_ordinary_one() -> None:
    before = memfds()
    for shape in (0, (0, 5), (3, 0)):
        empty = shared_array(shape)
        assert empty.shape == ((shape,) if isinstance(shape, int) else shape)
        assert empty.size == 0 and empty.flags.writeable
        assert memfds() == before


@pytest.mark.parametrize(
    ("shape", "dtype", "order", "error", "match"),
    [
        (-1, float, "C", ValueError, "negative"),
        ((3, -2), float, "C", ValueError, "negative"),
        (2.5, float, "C", TypeError, "shape must be an integer"),
        (("a", 2), float, "C", TypeError, "shape must be an integer"),
        (4, object, "C", TypeError, "Python objects"),
        (4, [("a", "i4"), ("b", "O")], "C", TypeError, "Python objects"),
        (4, float, "K", ValueError, "order must be"),
        ((1 << 40, 1 << 40), float, "C", ValueError, "too large"),
        (4, "no such dtype", "C", TypeError, "data type"),
    ],
)
def test_bad_input_raises_and_leaves_nothing_open(
    shape: Any, dtype: Any, order: Any, error: type[Exception], match: str
) -> None:
    before = memfds()
    with pytest.raises(error, match=match):
        shared_array(shape, dtype, order=order)
    assert memfds() == before


def test_without_numpy_it_says_numpy_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # (import numpy raises ImportError)
    with pytest.raises(ImportError, match="needs numpy"):
        shared_array(10)


# -- tasks read it: its own segment, no copy, no check -------------------------------------


def count_content_checks(monkeypatch: pytest.MonkeyPatch) -> list[_buffers.Segment]:
    """The segments whose content `share` checks from now on (``Segment.holds``), in order."""
    checks: list[_buffers.Segment] = []
    holds = _buffers.Segment.holds

    def counted(segment: _buffers.Segment, view: memoryview) -> bool:
        checks.append(segment)
        return holds(segment, view)

    monkeypatch.setattr(_buffers.Segment, "holds", counted)
    return checks


def test_tasks_read_its_own_memory_and_nothing_is_written_or_checked(
    pool: BaseWorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    array = counting()
    checks = count_content_checks(monkeypatch)
    written = _buffers.segments_written
    futures = [pool.submit(sum_and_memfd_mappings, array) for _ in range(12)]
    results = [future.result(timeout=60) for future in futures]
    assert _buffers.segments_written == written
    assert checks == []
    expected = float(array.sum())
    for total, mapped in results:
        assert total == expected
        assert ARRAY_MEMFD in mapped and COPY_MEMFD not in mapped  # (the array's own memfd)


def test_an_ordinary_array_is_still_copied_and_checked(
    pool: BaseWorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The other side of the test above: what it would see without a shared array.)
    checks = count_content_checks(monkeypatch)
    ordinary = np.arange(LARGE, dtype=np.float64)
    written = _buffers.segments_written
    # (A task that waits holds its segment, which the next submit reuses once checked.)
    waiting = [pool.submit(sum_after, ordinary, 0.5) for _ in range(2)]
    total, mapped = pool.submit(sum_and_memfd_mappings, ordinary).result(timeout=60)
    assert [f.result(timeout=60) for f in waiting] == [total] * 2 == [float(ordinary.sum())] * 2
    assert _buffers.segments_written == written + 1
    assert len(checks) == 2
    assert COPY_MEMFD in mapped and ARRAY_MEMFD not in mapped


def test_views_of_all_of_it_are_sent_as_it_is(pool: BaseWorkerPool) -> None:
    matrix = shared_array((1024, LARGE // 1024))
    matrix[:] = np.arange(matrix.size).reshape(matrix.shape)
    written = _buffers.segments_written
    for whole in (matrix, matrix.T, matrix.reshape(-1), matrix.view(), np.asarray(matrix)):
        total, mapped = pool.submit(sum_and_memfd_mappings, whole).result(timeout=60)
        assert total == float(matrix.sum())
        assert ARRAY_MEMFD in mapped
    result = pool.submit(echo, matrix.T).result(timeout=60)
    assert result.flags.f_contiguous and np.array_equal(result, matrix.T)
    assert _buffers.segments_written == written


def test_a_slice_of_it_is_copied_and_arrives_right(pool: BaseWorkerPool) -> None:
    array = counting()
    written = _buffers.segments_written
    part = array[BUFFER_THRESHOLD // 8 :]  # (still over the threshold: out of band)
    total, mapped = pool.submit(sum_and_memfd_mappings, part).result(timeout=60)
    assert total == float(part.sum())
    assert COPY_MEMFD in mapped and ARRAY_MEMFD not in mapped
    assert _buffers.segments_written == written + 1
    strided = array[::2]  # (not contiguous: in the pickle)
    assert np.array_equal(pool.submit(echo, strided).result(timeout=60), strided)
    small = array[:10]  # (under the threshold: in the pickle)
    assert np.array_equal(pool.submit(echo, small).result(timeout=60), small)
    assert _buffers.segments_written == written + 1


def test_a_small_shared_array_travels_in_the_pickle(pool: BaseWorkerPool) -> None:
    small = shared_array(100)
    small[:] = 2.0
    written = _buffers.segments_written
    assert pool.submit(sum_after, small, 0.0).result(timeout=60) == 200.0
    assert _buffers.segments_written == written


def test_a_managers_pools_read_it() -> None:
    made = shared_array(LARGE)
    made[:] = 3.0
    written = _buffers.segments_written
    with WorkerPoolManager(
        2, 600, 3600, memory_sample_interval=None, handle_signals=False
    ) as manager:
        with manager.lease("a") as pool:
            assert pool.submit(sum_after, made, 0.0).result(timeout=60) == 3.0 * LARGE
        pool, done = manager.get_pool("b", send_size=2)
        try:
            futures = [pool.submit(sum_and_memfd_mappings, made) for _ in range(4)]
            for future in futures:
                total, mapped = future.result(timeout=60)
                assert total == 3.0 * LARGE and ARRAY_MEMFD in mapped
        finally:
            done()
    assert _buffers.segments_written == written


# -- semantics ------------------------------------------------------------------------


def test_a_task_writing_to_its_argument_changes_nothing_here() -> None:
    array = counting()
    expected = float(array.sum())
    with BaseWorkerPool(1) as pool:
        # (One worker: both tasks may come in one batch, from one segment.)
        futures = [pool.submit(add_one_and_sum, array) for _ in range(2)]
        assert [f.result(timeout=60) for f in futures] == [expected + LARGE] * 2
        assert float(array.sum()) == expected
        assert array[0] == 0.0 and array[-1] == LARGE - 1
        assert pool.submit(sum_after, array, 0.0).result(timeout=60) == expected


def test_the_callers_writes_before_a_submit_are_what_the_task_reads(pool: BaseWorkerPool) -> None:
    array = counting()
    assert pool.submit(sum_after, array, 0.0).result(timeout=60) == float(array.sum())
    array[:] = 1.0  # (the same segment, sent again: its content now)
    assert pool.submit(sum_after, array, 0.0).result(timeout=60) == float(LARGE)


def test_it_works_as_a_pools_shared_data_with_no_copy() -> None:
    array = counting()
    before, written = memfds(), _buffers.segments_written
    with BaseWorkerPool(2, shared_data=array) as pool:
        assert memfds() == before  # (the pool holds the array's own segment)
        results = [pool.submit(shared_sum).result(timeout=60) for _ in range(4)]
        assert results == [float(array.sum())] * 4
        writeable, owns_data, _ = pool.submit(shared_data_flags).result(timeout=60)
        assert (writeable, owns_data) == (False, False)  # (read-only, shared)
    assert _buffers.segments_written == written
    assert memfds() == before


def test_a_pool_keeps_its_shared_array_after_the_caller_drops_it() -> None:
    before = memfds()
    made = shared_array(LARGE)
    made[:] = 5.0
    with BaseWorkerPool(1, max_tasks_per_worker=1, shared_data=made) as pool:
        del made
        gc.collect()
        assert memfds() == before + 1  # (the segment, held by the pool; the mapping is gone)
        # (A new worker for each task: each maps the segment after the array is gone.)
        assert [pool.submit(shared_sum).result(timeout=60) for _ in range(3)] == [5.0 * LARGE] * 3
    assert freed(before)


# -- lifetime ----------------------------------------------------------------------------


def test_its_descriptor_closes_when_the_array_and_its_views_are_gone() -> None:
    before = memfds()
    made = shared_array(LARGE)
    assert memfds() == before + DESCRIPTORS
    view = made[10:]
    del made
    gc.collect()
    assert memfds() == before + DESCRIPTORS  # (the view holds the mapping)
    view[0] = 1.0
    del view
    assert freed(before)


def test_a_task_holds_the_memory_after_the_caller_drops_the_array() -> None:
    with BaseWorkerPool(1) as pool:
        pool.submit(echo, 1).result(timeout=60)  # (the worker, started)
        before = memfds()
        made = shared_array(LARGE)
        made[:] = 2.0
        blocker = pool.submit(time.sleep, 0.5)
        running = pool.submit(sum_after, made, 0.0)  # (queued behind the blocker)
        del made
        gc.collect()
        assert memfds() == before + 1  # (the task's hold on the segment; no mapping left)
        blocker.result(timeout=60)
        assert running.result(timeout=60) == 2.0 * LARGE
        assert freed(before)


def test_the_descriptor_closes_once_the_tasks_and_the_array_are_gone(
    pool: BaseWorkerPool,
) -> None:
    pool.submit(echo, 1).result(timeout=60)
    before = memfds()
    made = shared_array(LARGE)
    futures = [pool.submit(sum_after, made, 0.05) for _ in range(6)]
    assert [f.result(timeout=60) for f in futures] == [0.0] * 6
    assert memfds() == before + DESCRIPTORS  # (the array's own, no other segment)
    del made, futures
    assert freed(before)


# -- memory: the whole job holds it once ------------------------------------------------------


def test_the_whole_job_holds_a_100_mb_array_once_while_20_tasks_read_it() -> None:
    from benchmarks.suite_memory import JobPeak

    size = 100_000_000
    with BaseWorkerPool(4) as pool:
        # (All 4 workers started, numpy imported in each: what the job's
        # memory should count is what the array costs.)
        assert len(set(pool.map(numpy_imported_pid, [0.3] * 4))) == 4
        with JobPeak() as job:
            made = shared_array(size // 8)
            made[:] = 1.0  # (every page written)
            futures = [pool.submit(sum_after, made, 0.0) for _ in range(20)]
            assert [f.result(timeout=60) for f in futures] == [float(size // 8)] * 20
        del made, futures
    # The parent, the fork server and the workers (PSS at the start, then the
    # growth of their own memory, and every memfd any of them holds or maps,
    # each counted once): the array, and little else. An ordinary array
    # would take twice this (the caller's, and its segment).
    growth = job.peak - job.baseline
    assert growth < 1.2 * size, job.details()


# -- the application's own fork ---------------------------------------------------------------


def _run(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter and session; on a timeout, end all of it."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"timed out (a fork hung?):\n{out}{err}")
    assert process.returncode == 0, out + err
    return out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_in_a_forked_child_it_still_works_and_is_copied() -> None:
    out = _run(
        """
        import os, sys
        from pool_manager import BaseWorkerPool, _buffers, shared_array

        def total(array):
            return float(array.sum())

        array = shared_array(1 << 19)  # (4 MiB)
        array[:] = 3.0
        with BaseWorkerPool(1) as pool:
            written = _buffers.segments_written
            assert pool.submit(total, array).result(timeout=30) == 3.0 * array.size
            print("parent-before", _buffers.segments_written - written, flush=True)
        pid = os.fork()
        if pid == 0:
            with BaseWorkerPool(1) as pool:
                written = _buffers.segments_written
                got = pool.submit(total, array).result(timeout=30)
                copies = _buffers.segments_written - written
            print("child", array.base.segment.fd, got / array.size, copies, flush=True)
            array[0] = 1003.0  # (the parent's memory: shared)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        with BaseWorkerPool(1) as pool:
            written = _buffers.segments_written
            got = pool.submit(total, array).result(timeout=30)
            print("parent-after", os.waitstatus_to_exitcode(status), array[0],
                  got - 3.0 * array.size, _buffers.segments_written - written)
        """
    )
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["parent-before"] == "0"  # (no copy in the parent)
    # The child: its inherited descriptor closed, the array read through its
    # mapping and sent as a copy (a new segment), never as descriptor -1.
    assert lines["child"] == "-1 3.0 1"
    # The parent: the child's write is in its memory (a shared mapping), and
    # the array is still sent as it is.
    assert lines["parent-after"] == "0 1003.0 1000.0 0"
