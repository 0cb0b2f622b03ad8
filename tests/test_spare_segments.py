"""Spare segments: the memory of a large buffer's segment is used again
(``_buffers.keep_spare``), never while anyone may still read it.

A task's large ``bytes`` argument is read by its worker into a ``bytes``
(no mapping), so once the task has settled its segment is kept as a spare
for the next one; a result the parent read into a copy is kept too, and a
worker whose last result was large gets one with its next batch, to write
its result into. A segment that any reader maps (a numpy argument, a
pool's shared data) is never kept: a mapping would see the next content.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import threading
import time
from typing import Any

import pytest

from pool_manager import BaseWorkerPool, _buffers
from pool_manager._protocol import BUFFER_THRESHOLD

from .helpers import memfds, poll

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def digest_and_echo(data: bytes) -> tuple[str, bytes]:
    return digest(data), data


def reversed_bytes(data: bytes) -> bytes:
    return data[::-1]


def buffer_mappings() -> int:
    """How many of this process's mappings are memfd segments."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:pool_manager-buffer" in line for line in maps)


def mappings_while_holding(value: Any) -> int:
    return buffer_mappings()


_kept: list[Any] = []


def keep_argument(array: Any) -> str:
    """Keep the argument (its mapping) past the task, as a task may."""
    _kept.append(array)
    return digest(array)


def digest_of_kept() -> str:
    return digest(_kept[-1])


def large_result(size: int) -> bytes:
    return os.urandom(size)


def array_result_and_spares_taken(size: int) -> tuple[Any, int]:
    return np.ones(size // 8), _buffers.spares_taken


def memfds_in_worker() -> int:
    return memfds()


@pytest.fixture
def pool() -> Any:
    pool = BaseWorkerPool(1)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def test_a_large_bytes_argument_is_read_and_a_numpy_one_mapped(pool: BaseWorkerPool) -> None:
    data = os.urandom(2 * BUFFER_THRESHOLD)
    array = np.arange(2 * BUFFER_THRESHOLD // 8, dtype=np.float64)
    assert pool.submit(mappings_while_holding, data).result() == 0
    assert pool.submit(mappings_while_holding, array).result() == 1


def test_the_next_large_argument_is_written_into_the_last_ones_memory(
    pool: BaseWorkerPool,
) -> None:
    first, second = os.urandom(3 * MIB), os.urandom(2 * MIB)
    assert pool.submit(digest_and_echo, first).result() == (digest(first), first)
    taken = _buffers.spares_taken
    assert pool.submit(digest_and_echo, second).result() == (digest(second), second)
    assert _buffers.spares_taken > taken


def test_a_worker_writes_its_next_large_result_into_a_blank_it_was_given(
    pool: BaseWorkerPool,
) -> None:
    size = 2 * BUFFER_THRESHOLD
    assert len(pool.submit(large_result, size).result()) == size
    array, taken = pool.submit(array_result_and_spares_taken, size).result()
    assert array.sum() == size // 8
    # (A worker's counter: it took the blank its batch brought, for its array.)
    _, taken_after = pool.submit(array_result_and_spares_taken, size).result()
    assert taken_after > taken


def test_a_blank_a_worker_did_not_use_is_not_kept_past_its_batch(pool: BaseWorkerPool) -> None:
    assert len(pool.submit(large_result, 2 * BUFFER_THRESHOLD).result()) == 2 * BUFFER_THRESHOLD
    # The next batch brings a blank (the last result was large): held while it runs...
    assert pool.submit(memfds_in_worker).result() == 1
    # ...and closed after it; a small result brings none.
    assert pool.submit(memfds_in_worker).result() == 0


def test_a_mapped_argument_is_never_written_over(pool: BaseWorkerPool) -> None:
    array = np.random.default_rng(1).random(3 * MIB // 8)
    expected = digest(array)
    assert pool.submit(keep_argument, array).result() == expected
    del array  # (its segment is released: a mapping in the worker still reads it)
    for seed in range(6):
        data = random.Random(seed).randbytes(3 * MIB)
        assert pool.submit(digest_and_echo, data).result()[0] == digest(data)
        assert pool.submit(reversed_bytes, data).result() == data[::-1]
    assert pool.submit(digest_of_kept).result() == expected


def test_a_segment_a_reader_maps_is_never_kept_as_a_spare() -> None:
    data = os.urandom(2 * BUFFER_THRESHOLD)
    buffer = pickle.PickleBuffer(data)
    (copied,) = _buffers.share([buffer], copy=True)
    assert copied.copied
    (same,) = _buffers.share([buffer])  # (a pool's shared data: its workers map it)
    assert same is copied and not copied.copied
    (again,) = _buffers.share([buffer], copy=True)
    assert again is copied and not copied.copied  # (never turned back on)
    array = np.ones(2 * BUFFER_THRESHOLD // 8)
    (mapped,) = _buffers.share([pickle.PickleBuffer(array)], copy=True)
    assert not mapped.copied


def test_many_tasks_on_many_workers_each_get_their_own_bytes() -> None:
    """No task ever reads another's argument, nor a caller another's result,
    while segments are kept and used again across workers and threads."""
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(MIB, 3 * MIB)) for _ in range(24)]
    arrays = [np.full(MIB // 8 + index, float(index)) for index in range(4)]
    pool = BaseWorkerPool(3)
    errors: list[BaseException] = []

    def submit_all(offset: int) -> None:
        try:
            for round_ in range(3):
                futures: list[tuple[Any, Any]] = []
                for index in range(offset, len(payloads), 3):
                    data = payloads[index]
                    futures.append((data, pool.submit(digest_and_echo, data)))
                    array = arrays[(index + round_) % len(arrays)]
                    futures.append((array, pool.submit(keep_argument, array)))
                for argument, future in futures:
                    if isinstance(argument, bytes):
                        assert future.result() == (digest(argument), argument)
                    else:
                        assert future.result() == digest(argument)
        except BaseException as error:
            errors.append(error)

    try:
        threads = [threading.Thread(target=submit_all, args=(offset,)) for offset in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors[0]
    finally:
        pool.shutdown(wait=True)


def test_a_segment_being_released_is_never_found_for_reuse() -> None:
    """Threads share the same buffers while their segments are collected: a
    lookup by content never gets a segment whose descriptor its release is
    closing or keeping. (A ``__del__`` runs before the weak references that
    the lookup reads are cleared, and releases the GIL as it closes.)"""
    array = np.ones(MIB // 8)
    data = os.urandom(MIB)
    problems: list[object] = []
    deadline = time.monotonic() + 3.0

    def share_and_drop(exporter: object, copy: bool) -> None:
        try:
            for _ in range(20_000):
                if problems or time.monotonic() > deadline:
                    return
                (segment,) = _buffers.share([pickle.PickleBuffer(exporter)], copy=copy)
                if segment.fd < 0:
                    problems.append(("closed", type(exporter).__name__))
                else:
                    os.fstat(segment.fd)
                del segment  # (collected now: released while the others look it up)
        except BaseException as error:
            problems.append(error)

    _buffers.keep_spares(True)
    try:
        threads = [
            threading.Thread(target=share_and_drop, args=(exporter, copy))
            for exporter, copy in [(array, False), (array, False), (data, True), (data, True)]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        _buffers.keep_spares(False)
    assert problems == []


def test_spares_are_bounded_and_trimmed_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_buffers, "_monotonic", lambda: now[0])
    before = memfds()
    _buffers.keep_spares(True)
    try:
        fds = [os.memfd_create("pool_manager-buffer") for _ in range(_buffers.SPARE_COUNT + 1)]
        for fd in fds:
            _buffers.keep_spare(fd, MIB)
        assert memfds() == before + _buffers.SPARE_COUNT  # (one too many: closed)
        too_large = os.memfd_create("pool_manager-buffer")
        _buffers.keep_spare(too_large, _buffers.SPARE_SIZE + 1)
        assert memfds() == before + _buffers.SPARE_COUNT
        now[0] += _buffers.SPARE_AGE / 2
        assert _buffers.trim_spares()
        assert memfds() == before + _buffers.SPARE_COUNT
        now[0] += _buffers.SPARE_AGE
        assert not _buffers.trim_spares()
        assert memfds() == before
    finally:
        _buffers.keep_spares(False)
    assert memfds() == before


def test_spares_are_kept_only_while_the_io_loop_runs() -> None:
    before = memfds()
    fd = os.memfd_create("pool_manager-buffer")
    _buffers.keep_spare(fd, MIB)  # (no loop: closed at once)
    assert memfds() == before
    _buffers.keep_spares(True)
    _buffers.keep_spare(os.memfd_create("pool_manager-buffer"), MIB)
    assert memfds() == before + 1
    _buffers.keep_spares(False)  # (the loop's end closes them)
    assert memfds() == before


def test_the_io_loop_closes_spares_that_wait_too_long(pool: BaseWorkerPool) -> None:
    before = memfds()
    data = os.urandom(2 * BUFFER_THRESHOLD)
    assert pool.submit(digest_and_echo, data).result()[0] == digest(data)
    assert memfds() > before  # (the pool's workers live on: so does the loop)
    assert poll(lambda: memfds() == before, 10 * _buffers.SPARE_AGE + 10, 0.05)


def test_a_forked_child_does_not_keep_its_parents_spares() -> None:
    _buffers.keep_spares(True)
    fd = os.memfd_create("pool_manager-buffer")
    try:
        _buffers.keep_spare(fd, MIB)
        assert _buffers._take_spare() == fd
        _buffers.keep_spare(fd, MIB)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                if _buffers._take_spare() != -1:
                    code = 3
                else:
                    os.fstat(fd)  # (must be closed: raises)
                    code = 4
            except OSError:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _buffers._take_spare() == fd  # (the parent's is still there)
        os.close(fd)
    finally:
        _buffers.keep_spares(False)


def test_a_release_never_waits_for_the_spares_lock() -> None:
    """A segment released while the lock is held (a signal handler, a
    collection on the thread that holds it) is closed, not kept, and nothing
    waits."""
    before = memfds()
    _buffers.keep_spares(True)
    try:
        with _buffers._spares_lock:
            _buffers.keep_spare(os.memfd_create("pool_manager-buffer"), MIB)
            assert memfds() == before
            assert _buffers._take_spare() == -1
            assert _buffers.trim_spares(0) is False
    finally:
        _buffers.keep_spares(False)


def test_a_pool_ended_by_a_signal_mid_echo_loses_nothing() -> None:
    """SIGALRM's handler releases segments while the main thread may be in
    the spares' code: it never hangs."""
    pool = BaseWorkerPool(1)
    payloads = [os.urandom(2 * MIB) for _ in range(4)]
    futures: list[Any] = []

    def release(signum: int, frame: Any) -> None:
        futures.clear()  # (drops futures, their payloads, their segments)

    previous = signal.signal(signal.SIGALRM, release)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        for _ in range(20):
            for data in payloads:
                future = pool.submit(reversed_bytes, data)
                futures.append(future)
                assert future.result() == data[::-1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        pool.shutdown(wait=True)


def test_a_spare_closed_elsewhere_is_never_written_into_nor_closed_again() -> None:
    """A kept descriptor that something else closed, its number then reused by
    another file: that file is neither handed out as a spare nor closed."""
    _buffers.keep_spares(True)
    try:
        fd = os.memfd_create("pool_manager-buffer")
        _buffers.keep_spare(fd, MIB)
        os.close(fd)  # (behind the spares' back)
        other = os.memfd_create("someone-else")
        assert other == fd  # (the lowest free number: the same one)
        assert _buffers._take_spare() == -1
        os.fstat(other)  # (still open)
        _buffers.keep_spare(fd, MIB)  # (closed elsewhere again, and the number kept anew)
        os.close(other)
        another = os.memfd_create("someone-else")
        assert another == fd
        _buffers.keep_spare(os.memfd_create("pool_manager-buffer"), MIB)
        assert not _buffers.trim_spares(0)
        os.fstat(another)  # (the stale entries were dropped, not closed)
        os.close(another)
    finally:
        _buffers.keep_spares(False)
