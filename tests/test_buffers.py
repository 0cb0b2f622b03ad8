"""Large buffers travel out of band, through shared memory (``_buffers.py``).

Arguments and results holding numpy arrays, or large top-level ``bytes`` and
``bytearray`` objects, round-trip exactly; each buffer is written once into a
memfd whose descriptor the worker maps; the parent closes it once no
unfinished task uses it, however the task ended.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import sys
import threading
import time
from concurrent.futures import CancelledError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_manager import (
    ArgumentUnpicklingError,
    BaseWorkerPool,
    ResultUnpicklingError,
    TaskTimeoutError,
    WorkerLostError,
    _buffers,
    _pool_dispatch,
    _protocol,
    _worker,
)
from pool_manager._protocol import (
    BUFFER_THRESHOLD,
    TO_WORKER,
    WithBuffers,
    dump_call,
    load_outcome,
)

from .helpers import (
    add_one_and_sum,
    echo,
    exit_with,
    first_item_after,
    memfds,
    ones,
    peak_growth,
    poll,
    raise_with,
    sleep_with,
    writable_result_flags,
)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(90)

#: Enough elements (float64) to pass the threshold a few times over.
LARGE = 4 * BUFFER_THRESHOLD // 8


def freed(before: int) -> bool:
    gc.collect()
    return bool(poll(lambda: memfds() == before, 15.0, 0.02))


@pytest.fixture
def pool() -> Any:
    pool = BaseWorkerPool(2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(LARGE, dtype=np.float64),
        np.arange(LARGE, dtype=np.int32).reshape(-1, 64),
        (np.arange(LARGE // 2) * (1 + 2j)).astype(np.complex128),
        np.asfortranarray(np.arange(LARGE, dtype=np.float32).reshape(1024, -1)),
        np.zeros((LARGE // 8, 2), dtype=[("a", "i4"), ("b", "f8")]),
    ],
    ids=["float64", "int32-2d", "complex", "fortran", "structured"],
)
def test_a_large_array_round_trips_exactly(pool: BaseWorkerPool, array: Any) -> None:
    written = _buffers.segments_written
    result = pool.submit(echo, array).result(timeout=60)
    assert _buffers.segments_written == written + 1  # (the argument; the result is the worker's)
    assert result.dtype == array.dtype
    assert result.shape == array.shape
    assert result.flags.f_contiguous == array.flags.f_contiguous
    assert result.flags.c_contiguous == array.flags.c_contiguous
    assert np.array_equal(result, array)


def test_a_non_contiguous_array_travels_in_band(pool: BaseWorkerPool) -> None:
    array = np.arange(2 * LARGE, dtype=np.float64).reshape(-1, 2)[:, 0]
    assert not array.flags.contiguous
    written = _buffers.segments_written
    result = pool.submit(echo, array).result(timeout=60)
    assert _buffers.segments_written == written
    assert np.array_equal(result, array)


def test_small_buffers_stay_in_band(pool: BaseWorkerPool) -> None:
    small = np.arange(BUFFER_THRESHOLD // 8 - 1, dtype=np.float64)
    assert isinstance(dump_call(echo, (small,), {}), bytes)
    assert isinstance(dump_call(echo, (b"x" * (BUFFER_THRESHOLD - 1),), {}), bytes)
    written = _buffers.segments_written
    assert np.array_equal(pool.submit(echo, small).result(timeout=60), small)
    assert _buffers.segments_written == written


def test_large_buffers_leave_the_pickle() -> None:
    array = np.arange(LARGE, dtype=np.float64)
    for payload in (
        dump_call(echo, (array,), {}),
        dump_call(echo, (), {"value": b"x" * BUFFER_THRESHOLD}),
        dump_call(echo, (bytearray(BUFFER_THRESHOLD),), {}),
        dump_call(lambda value: value, ([array, array],), {}),
    ):
        assert isinstance(payload, WithBuffers)
        assert len(payload.data) < 1000


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_large_bytes_round_trip_as_the_same_type(pool: BaseWorkerPool, kind: type) -> None:
    data = kind(os.urandom(3 * BUFFER_THRESHOLD + 5))
    written = _buffers.segments_written
    result = pool.submit(echo, data).result(timeout=60)
    assert type(result) is kind
    assert result == data
    assert _buffers.segments_written == written + 1
    assert pool.submit(echo, value=data).result(timeout=60) == data


def test_a_large_result_comes_back_through_shared_memory(pool: BaseWorkerPool) -> None:
    before = memfds()
    result = pool.submit(ones, LARGE).result(timeout=60)
    assert result.shape == (LARGE,)
    assert float(result.sum()) == LARGE
    result[0] = 5.0  # (its own: writable)
    assert result[0] == 5.0
    if sys.version_info >= (3, 13):
        assert memfds() == before  # (mapped, and its descriptor closed)
    del result
    assert freed(before)


def test_a_task_may_write_to_its_argument_without_changing_anyone_elses() -> None:
    array = np.zeros(LARGE)
    with BaseWorkerPool(1) as pool:
        # (One worker, so both tasks may come in one batch, from one segment.)
        futures = [pool.submit(add_one_and_sum, array) for _ in range(2)]
        assert [f.result(timeout=60) for f in futures] == [float(LARGE), float(LARGE)]
        assert not array.any()
        flags = pool.submit(writable_result_flags, array).result(timeout=60)
        assert flags == (True, 0.0)


def test_a_map_over_arrays(pool: BaseWorkerPool) -> None:
    arrays = [np.full(LARGE, float(i)) for i in range(4)]
    results = list(pool.map(echo, arrays))
    assert all(np.array_equal(a, b) for a, b in zip(results, arrays, strict=True))


# -- dedupe and snapshots --------------------------------------------------------


def test_one_array_submitted_to_many_tasks_is_written_once(pool: BaseWorkerPool) -> None:
    array = np.arange(LARGE, dtype=np.float64)
    written = _buffers.segments_written
    futures = [pool.submit(first_item_after, array, 0.2) for _ in range(8)]
    assert [f.result(timeout=60) for f in futures] == [0.0] * 8
    assert _buffers.segments_written == written + 1


def test_the_same_bytes_submitted_to_many_tasks_is_written_once(pool: BaseWorkerPool) -> None:
    data = os.urandom(2 * BUFFER_THRESHOLD)
    written = _buffers.segments_written
    futures = [pool.submit(echo, data) for _ in range(6)]
    assert all(f.result(timeout=60) == data for f in futures)
    assert _buffers.segments_written == written + 1


def test_a_task_sees_its_argument_as_it_was_when_submitted(pool: BaseWorkerPool) -> None:
    array = np.zeros(LARGE)
    written = _buffers.segments_written
    first = pool.submit(first_item_after, array, 0.5)
    array[0] = 7.0
    second = pool.submit(first_item_after, array, 0.0)
    array[0] = 9.0  # (after both submits: neither sees it)
    assert first.result(timeout=60) == 0.0
    assert second.result(timeout=60) == 7.0
    assert _buffers.segments_written == written + 2


# -- lifetime: the parent closes each segment once no unfinished task uses it --


def test_segments_are_freed_after_success_and_error(pool: BaseWorkerPool) -> None:
    array = np.ones(LARGE)
    pool.submit(echo, 1).result(timeout=60)  # (the worker, started)
    before = memfds()
    fds_before = len(os.listdir("/proc/self/fd"))
    assert pool.submit(echo, array).result(timeout=60) is not None
    with pytest.raises(ValueError, match="failed with"):
        pool.submit(raise_with, array).result(timeout=60)
    assert freed(before)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_segment_lives_while_a_task_holds_it(pool: BaseWorkerPool) -> None:
    before = memfds()
    future = pool.submit(sleep_with, np.ones(LARGE), 1.0)
    assert memfds() == before + 1
    future.result(timeout=60)
    assert freed(before)


def test_segments_are_freed_when_a_queued_task_is_cancelled() -> None:
    with BaseWorkerPool(1) as pool:
        pool.submit(echo, 1).result(timeout=60)
        before = memfds()
        blocker = pool.submit(time.sleep, 1.0)
        queued = [pool.submit(echo, np.full(LARGE, float(i))) for i in range(3)]
        cancelled = [f for f in queued if f.cancel()]
        assert cancelled
        for future in cancelled:
            with pytest.raises(CancelledError):
                future.result(timeout=0)
        blocker.result(timeout=60)
        for future in queued:
            if future not in cancelled:
                future.result(timeout=60)
        assert freed(before)


def test_segments_are_freed_when_a_task_times_out() -> None:
    with BaseWorkerPool(1, task_timeout=0.5) as pool:
        pool.submit(echo, 1).result(timeout=60)
        before = memfds()
        with pytest.raises(TaskTimeoutError):
            pool.submit(sleep_with, np.ones(LARGE), 30.0).result(timeout=60)
        assert freed(before)


def test_segments_are_freed_when_a_worker_crashes(pool: BaseWorkerPool) -> None:
    pool.submit(echo, 1).result(timeout=60)
    before = memfds()
    with pytest.raises(WorkerLostError):
        pool.submit(exit_with, np.ones(LARGE)).result(timeout=60)
    assert freed(before)
    array = np.arange(LARGE, dtype=np.float64)
    assert np.array_equal(pool.submit(echo, array).result(timeout=60), array)


def test_segments_are_freed_at_shutdown() -> None:
    before = memfds()
    pool = BaseWorkerPool(2)
    futures = [pool.submit(first_item_after, np.full(LARGE, float(i)), 0.1) for i in range(6)]
    pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        assert future.cancelled() or future.result(timeout=0) is not None
    assert freed(before)


def test_segments_are_freed_when_a_pool_is_dropped_without_shutdown() -> None:
    before = memfds()
    pool = BaseWorkerPool(1)
    pool.submit(first_item_after, np.ones(LARGE), 0.0).result(timeout=60)
    pool.submit(sleep_with, np.ones(LARGE), 0.3)
    del pool
    assert freed(before)


# -- failures --------------------------------------------------------------------


def test_a_segment_the_worker_cannot_map_fails_the_task_as_its_arguments() -> None:
    payload = dump_call(echo, (np.ones(LARGE),), {})
    assert isinstance(payload, WithBuffers)
    read_end, write_end = os.pipe()  # (a descriptor that cannot be mapped)
    try:
        ok, data = _worker.run_task(payload.data, [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert not ok
    assert isinstance(data, bytes)
    ok, error = load_outcome(ok, data)
    assert isinstance(error, ArgumentUnpicklingError)


def test_a_result_whose_buffers_cannot_be_mapped_fails_clearly() -> None:
    result = _protocol.dump_result_out_of_band(np.ones(LARGE))
    assert isinstance(result, WithBuffers)
    ok, error = load_outcome(True, result.data, OSError("no descriptors"))
    assert not ok
    assert isinstance(error, ResultUnpicklingError)
    assert "could not be mapped" in str(error)


def test_a_segment_that_cannot_be_created_fails_the_submit(
    pool: BaseWorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(view: memoryview) -> int:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(_buffers, "write_segment", no_memory)
    future = pool.submit(echo, np.arange(LARGE, dtype=np.float64))
    with pytest.raises(pickle.PicklingError, match="shared memory"):
        future.result(timeout=60)


def test_more_buffers_than_a_message_carries(
    pool: BaseWorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the most buffers a call may have, the rest stay in band; past the
    # most descriptors a message may carry, a batch goes as several messages.
    monkeypatch.setattr(_protocol, "MAX_BUFFERS", 2)
    monkeypatch.setattr(_pool_dispatch, "MAX_DESCRIPTORS", 3)
    arrays = [np.full(LARGE, float(i)) for i in range(3)]
    written = _buffers.segments_written
    assert all(
        np.array_equal(a, b) for a, b in zip(pool.submit(echo, arrays).result(timeout=60), arrays)
    )
    assert _buffers.segments_written == written + 2
    futures = [pool.submit(echo, np.full(LARGE, float(i))) for i in range(8)]
    assert [float(f.result(timeout=60)[0]) for f in futures] == [float(i) for i in range(8)]


def test_the_parent_grows_by_less_than_the_array_for_many_tasks() -> None:
    array = np.random.default_rng(0).random(40_000_000 // 8)  # 40 MB
    growth: list[int] = []
    with BaseWorkerPool(2) as pool:
        pool.submit(echo, 1).result(timeout=60)
        with peak_growth(growth):
            futures = [pool.submit(first_item_after, array, 0.05) for _ in range(8)]
            assert [f.result(timeout=60) for f in futures] == [array[0]] * 8
    assert growth[0] < array.nbytes


def test_descriptors_that_cannot_be_passed_fail_their_tasks_not_the_worker(
    pool: BaseWorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (ETOOMANYREFS, more descriptors in flight than RLIMIT_NOFILE, cannot be
    # made to happen as root: a descriptor that is not open fails the same
    # way, nothing sent, and must not leave its task waiting forever.)
    pid = pool.submit(os.getpid).result(timeout=60)
    monkeypatch.setattr(
        _pool_dispatch, "descriptors_message", lambda fds: _buffers.descriptors_message([-1])
    )
    with pytest.raises(OSError, match="could not be passed to its worker"):
        pool.submit(echo, np.ones(LARGE)).result(timeout=60)
    monkeypatch.undo()
    array = np.arange(LARGE, dtype=np.float64)
    assert np.array_equal(pool.submit(echo, array).result(timeout=60), array)
    os.kill(pid, 0)  # (the worker lives on)


def test_a_segment_holds_a_buffer_only_while_its_content_is_unchanged() -> None:
    array = np.arange(BUFFER_THRESHOLD + 3, dtype=np.uint8)  # (not a whole number of chunks)
    view = memoryview(array).cast("B")
    segment = _buffers.Segment(view, array)
    try:
        assert segment.holds(view)
        array[-1] += 1  # (in the last, partial chunk)
        assert not segment.holds(view)
        array[-1] -= 1
        array[5] += 1
        assert not segment.holds(view)
    finally:
        segment.close()


def test_a_descriptor_that_did_not_arrive_fails_its_task_as_its_arguments() -> None:
    left, right = socket.socketpair()
    with left, right:
        inbox = _buffers.Inbox(right)
        assert inbox.take(2) == [-1, -1]
    payload = dump_call(echo, (np.ones(LARGE),), {})
    assert isinstance(payload, WithBuffers)
    ok, data = _worker.run_task(payload.data, [-1])
    assert not ok
    assert isinstance(data, bytes)
    assert isinstance(load_outcome(ok, data)[1], ArgumentUnpicklingError)


def test_a_map_chunk_with_a_deadline_returns_large_results() -> None:
    # (Its calls' results before the last are reported in band, with each
    # call's start; the chunk's own answer carries the rest out of band.)
    with BaseWorkerPool(1, task_timeout=30) as pool:
        results = list(pool.map(ones, [LARGE, LARGE + 1, LARGE + 2], chunksize=3))
    assert [len(result) for result in results] == [LARGE, LARGE + 1, LARGE + 2]
    assert all(float(result.sum()) == len(result) for result in results)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 3),  # kind
            st.sampled_from([0, 1, 7, 100, 65_530, 65_536, 70_000, 200_000]),  # body length
            st.booleans(),  # a descriptor comes with its first byte
            st.integers(1, 8),  # the parts it is written in
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 12),  # the end of the stream: this many bytes into the last message
)
def test_the_worker_reads_each_message_whole_however_it_arrives(
    messages: list[tuple[int, int, bool, int]], cut: int
) -> None:
    # Messages arrive in any split: whole, several in one receive, a header
    # cut in two, a large body in parts; the descriptors that come with a
    # message's first byte are there once the message is read. A stream that
    # ends inside a message ends the reading (None), never a short message.
    left, right = socket.socketpair()
    wire = TO_WORKER
    sent_fds: list[int] = []
    frames = []
    for number, (kind, length, with_fd, parts) in enumerate(messages):
        body = bytes([number % 256]) * length
        frames.append((wire.pack(length, kind) + body, with_fd, parts))

    def write() -> None:
        with left:
            for index, (frame, with_fd, parts) in enumerate(frames):
                if index == len(frames) - 1:
                    frame = frame[: min(cut, len(frame))] if cut < wire.size else frame
                step = max(1, len(frame) // parts)
                pieces = [frame[at : at + step] for at in range(0, len(frame), step)] or [b""]
                for number, piece in enumerate(pieces):
                    if number == 0 and with_fd and piece:
                        read_end, write_end = os.pipe()
                        os.close(write_end)
                        sent_fds.append(read_end)
                        left.sendmsg([piece], _buffers.descriptors_message([read_end]))
                    elif piece:
                        left.sendall(piece)

    writer = threading.Thread(target=write)
    writer.start()
    received: list[int] = []
    inbox = _buffers.Inbox(right)
    try:
        with right:
            for index, (kind, length, with_fd, _parts) in enumerate(messages):
                message = inbox.message(wire)
                if index == len(messages) - 1 and cut < wire.size:
                    assert message is None
                    break
                assert message is not None
                assert message[0] == kind
                assert message[1] == bytes([index % 256]) * length
                if with_fd:
                    (fd,) = inbox.take(1)
                    assert fd >= 0
                    received.append(fd)
            else:
                assert inbox.message(wire) is None  # (the writer has closed its end)
    finally:
        writer.join(30)
        assert not writer.is_alive()
        _buffers.close_all([*sent_fds, *received, *inbox.fds])
    assert len(received) == sum(
        1
        for index, message in enumerate(messages)
        if message[2] and not (index == len(messages) - 1 and cut < wire.size)
    )
