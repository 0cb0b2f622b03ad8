"""BaseWorkerPool as a drop-in Executor: submit, map, shutdown, errors, growth."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from pool_manager import (
    BaseWorkerPool,
    PoolShutDownError,
    ResultTimeoutError,
    WorkerLostError,
    WorkerPoolBrokenError,
)
from pool_manager._protocol import PartialChunk
from pool_manager._worker import run_chunk, run_chunk_single

from .helpers import (
    add,
    call_sys_exit,
    exit_process,
    fail_at,
    getpid,
    poll,
    raise_keyboard_interrupt,
    raise_timeout_error,
    raise_value_error,
    sleep_and_return_pid,
    square,
    touch_and_wait,
    wait_for_count,
    wait_for_path,
    wait_then_square,
)


@pytest.fixture
def pool() -> BaseWorkerPool:
    with BaseWorkerPool(2) as pool:
        yield pool  # type: ignore[misc]


# -- construction ---------------------------------------------------------------


def test_is_an_executor_with_all_workers_available_on_its_own() -> None:
    with BaseWorkerPool(4) as pool:
        assert isinstance(pool, Executor)
        assert pool.max_size == 4 and pool.worker_count == 4
        assert pool.max_pending is None


def test_max_workers_is_another_name_for_max_size() -> None:
    with BaseWorkerPool(max_workers=3) as pool:
        assert pool.max_size == 3
    with pytest.raises(TypeError, match="not both"):
        BaseWorkerPool(2, max_workers=3)
    with BaseWorkerPool() as pool:
        assert pool.max_size == len(os.sched_getaffinity(0)) or pool.max_size >= 1


@pytest.mark.parametrize("size", [0, -1])
def test_nonpositive_max_workers_is_a_value_error(size: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        BaseWorkerPool(size)


def test_bad_arguments_are_rejected_at_construction() -> None:
    with pytest.raises(TypeError):
        BaseWorkerPool("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BaseWorkerPool(2, initializer="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BaseWorkerPool(2, initargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BaseWorkerPool(2, max_pending=-1)
    with pytest.raises(ValueError):
        BaseWorkerPool(2, idle_timeout=0)
    with pytest.raises(ValueError, match="not supported"):
        BaseWorkerPool(2, mp_context="threads")
    with pytest.raises(TypeError, match="mp_context"):
        BaseWorkerPool(2, mp_context=42)


def test_mp_context_maps_onto_loky() -> None:
    with BaseWorkerPool(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(square, 6).result(timeout=60) == 36
    with BaseWorkerPool(1, mp_context="loky") as pool:
        assert pool.submit(square, 7).result(timeout=60) == 49


def test_construction_starts_no_process() -> None:
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    with BaseWorkerPool(3) as pool:
        after = {c.pid for c in psutil.Process().children(recursive=True)}
        assert after == before and pool.worker_pids() == []
        pool.submit(square, 1).result()
        # As ProcessPoolExecutor: a worker starts when a task finds none idle.
        assert len(pool.worker_pids()) == 1


def test_workers_start_as_work_needs_them(tmp_path: Path) -> None:
    with BaseWorkerPool(3) as pool:
        # Three tasks that can only finish together need three workers.
        futures = [pool.submit(wait_for_count, str(tmp_path), f"t{i}", 3) for i in range(3)]
        assert len({f.result(timeout=60) for f in futures}) == 3
        assert len(pool.worker_pids()) == 3


# -- submit ---------------------------------------------------------------------


def test_submit_returns_futures_with_results(pool: BaseWorkerPool) -> None:
    futures = [pool.submit(square, i) for i in range(50)]
    assert all(isinstance(f, Future) for f in futures)
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(50)]


def test_keyword_arguments_named_fn_and_self_reach_the_task(pool: BaseWorkerPool) -> None:
    def echo(**kwargs: object) -> dict[str, object]:
        return kwargs

    assert pool.submit(echo, fn=1, self=2).result() == {"fn": 1, "self": 2}
    assert pool.submit(add, 1, y=2).result() == 3


def test_lambdas_and_closures_travel_with_cloudpickle(pool: BaseWorkerPool) -> None:
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    assert pool.submit(lambda x: x * 3, 5).result() == 15
    assert pool.submit(closure, 5).result() == 15


def test_non_callable_fn_is_a_type_error(pool: BaseWorkerPool) -> None:
    with pytest.raises(TypeError, match="callable"):
        pool.submit(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        pool.map(None, [1])  # type: ignore[arg-type]


def test_task_exception_keeps_its_type_and_carries_the_worker_traceback(
    pool: BaseWorkerPool,
) -> None:
    future = pool.submit(raise_value_error, "bad input 7")
    with pytest.raises(ValueError, match="bad input 7") as caught:
        future.result()
    cause = caught.value.__cause__
    from concurrent.futures.process import _RemoteTraceback

    assert isinstance(cause, _RemoteTraceback)  # as ProcessPoolExecutor attaches it
    assert "raise_value_error" in str(cause) and "Traceback" in str(cause)
    assert "helpers.py" in "".join(traceback.format_exception(caught.value))


def test_sys_exit_and_keyboard_interrupt_in_a_task_do_not_take_the_pool_down(
    pool: BaseWorkerPool,
) -> None:
    with pytest.raises(SystemExit):
        pool.submit(call_sys_exit, 3).result(timeout=60)
    with pytest.raises(KeyboardInterrupt):
        pool.submit(raise_keyboard_interrupt).result(timeout=60)
    assert pool.submit(square, 9).result(timeout=60) == 81


class _Unpicklable:
    def __reduce__(self) -> tuple[object, ...]:
        raise pickle.PicklingError("this object refuses to be pickled")


def _return_unpicklable() -> object:
    return threading.Lock()


def test_unpicklable_argument_fails_only_its_future(pool: BaseWorkerPool) -> None:
    future = pool.submit(square, _Unpicklable())
    with pytest.raises(pickle.PicklingError) as caught:
        future.result(timeout=60)
    assert "refuses" in str(caught.value) + str(caught.value.__cause__)
    assert pool.submit(square, 3).result(timeout=60) == 9


def test_unpicklable_result_fails_only_its_future(pool: BaseWorkerPool) -> None:
    future = pool.submit(_return_unpicklable)
    with pytest.raises(Exception, match="pickle"):
        future.result(timeout=60)
    assert not isinstance(future.exception(), BrokenExecutor)
    assert pool.submit(square, 4).result(timeout=60) == 16


def test_submit_after_shutdown_is_a_runtime_error() -> None:
    pool = BaseWorkerPool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)
    with pytest.raises(PoolShutDownError):
        pool.map(square, [1])


def test_futures_work_with_wait_and_as_completed(pool: BaseWorkerPool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = pool.submit(wait_for_path, str(gate))
    fast = pool.submit(square, 3)
    done, not_done = wait([slow, fast], timeout=60, return_when=FIRST_COMPLETED)
    assert fast in done and slow in not_done
    gate.touch()
    assert set(as_completed([slow, fast], timeout=60)) == {slow, fast}


def test_cancel_stops_a_task_that_has_not_started(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    with BaseWorkerPool(1) as pool:
        running = pool.submit(touch_and_wait, str(started), str(gate))
        queued = [pool.submit(square, i) for i in range(10)]
        assert poll(started.exists)
        assert poll(running.running)
        assert not running.cancel()
        last = queued[-1]  # deep in the queue, not yet handed to a worker
        assert last.cancel() and last.cancelled() and last.done()
        with pytest.raises(CancelledError):
            last.result()
        done, _ = wait([last], timeout=5)
        assert last in done
        gate.touch()
        assert running.result(timeout=60) == running.result()
        assert [f.result(timeout=60) for f in queued[:-1]] == [i * i for i in range(9)]
        assert pool.unfinished_tasks == 0


# -- map ----------------------------------------------------------------------


def test_map_keeps_order_over_several_iterables(pool: BaseWorkerPool) -> None:
    assert list(pool.map(add, range(20), range(100, 120))) == [
        a + b for a, b in zip(range(20), range(100, 120))
    ]


@pytest.mark.parametrize("chunksize", [1, 3, 7, 100])
def test_map_with_chunks_returns_every_result_in_order(
    pool: BaseWorkerPool, chunksize: int
) -> None:
    assert list(pool.map(square, range(50), chunksize=chunksize)) == [i * i for i in range(50)]


def test_map_rejects_a_chunksize_below_one(pool: BaseWorkerPool) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(square, [1], chunksize=0)


def test_map_raises_the_task_error_in_order(pool: BaseWorkerPool) -> None:
    results = pool.map(lambda x: 1 / x, [1, 2, 0, 4])
    assert next(results) == 1.0 and next(results) == 0.5
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.parametrize("bad", [0, 1, 1500, 1999])
@pytest.mark.parametrize("iterables", [1, 2])
def test_auto_chunked_map_yields_every_result_before_the_failing_item(
    pool: BaseWorkerPool, bad: int, iterables: int
) -> None:
    # As with one task per call (ProcessPoolExecutor's default): the error
    # costs no result of the items before it, in its chunk or another.
    items = range(2000)
    results = (
        pool.map(fail_at, items, itertools.repeat(bad, 2000))
        if iterables == 2
        else pool.map(functools.partial(fail_at, bad=bad), items)
    )
    got = []
    with pytest.raises(ValueError, match=f"bad item {bad}") as caught:
        for result in results:
            got.append(result)
    assert got == list(range(bad))
    assert "fail_at" in str(caught.value.__cause__)  # the worker's traceback


def test_chunk_runners_return_the_results_before_a_failing_call() -> None:
    partial = run_chunk_single(fail_at, [3, 2, 0, 1])
    assert isinstance(partial, PartialChunk) and partial.results == [3, 2]
    assert run_chunk(fail_at, [(3, 9), (2, 9)]) == [3, 2]
    with pytest.raises(ValueError):
        run_chunk(fail_at, [(0, 0), (1, 0)])  # the first call: raised, as a task's


def test_map_timeout_counts_from_the_call(pool: BaseWorkerPool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    results = pool.map(wait_for_path, [str(gate)], timeout=0.2)
    with pytest.raises(TimeoutError):
        next(results)
    gate.touch()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_a_map_timeout_is_caught_as_either_timeout_error_on_every_version(
    pool: BaseWorkerPool, tmp_path: Path, chunksize: int
) -> None:
    # On 3.10 concurrent.futures.TimeoutError is not the builtin TimeoutError:
    # code written for either must catch it.
    gate = tmp_path / "gate"
    try:
        results = pool.map(
            wait_then_square, [str(gate)] * 4, range(4), timeout=0.2, chunksize=chunksize
        )
        with pytest.raises(concurrent.futures.TimeoutError) as caught:
            next(results)
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, ResultTimeoutError)
        assert "not ready within its timeout" in str(caught.value)
        again = pool.map(wait_then_square, [str(gate)], [5], timeout=0.1, chunksize=chunksize)
        with pytest.raises(TimeoutError):
            next(again)
    finally:
        gate.touch()


@pytest.mark.timeout(60)
def test_map_timeout_counts_while_its_first_submits_wait_for_room(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    try:
        with BaseWorkerPool(1, max_pending=2) as pool:
            blocker = pool.submit(wait_for_path, str(gate))  # the only worker is busy
            started = time.monotonic()
            with pytest.raises(ResultTimeoutError):
                # Room for two more: the map's third submit waits until the timeout.
                pool.map(square, range(5), timeout=0.5, chunksize=1)
            assert 0.5 <= time.monotonic() - started < 30
            counts = pool.task_counts()
            assert counts["submitted"] == 3 and counts["cancelled"] == 2  # what it sent
            gate.touch()
            assert blocker.result(timeout=30) == str(gate)
    finally:
        gate.touch()


def test_a_task_that_raises_timeout_error_in_a_map_with_a_timeout_keeps_its_own_error(
    pool: BaseWorkerPool,
) -> None:
    results = pool.map(raise_timeout_error, ["the task's own"], timeout=30, chunksize=1)
    with pytest.raises(TimeoutError, match="the task's own") as caught:
        next(results)
    assert not isinstance(caught.value, ResultTimeoutError)


@pytest.mark.timeout(60)
def test_map_timeout_counts_while_it_waits_for_room_during_iteration(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    try:
        with BaseWorkerPool(1, max_pending=1) as pool:
            started = time.monotonic()
            results = pool.map(square, range(4), timeout=1.0, chunksize=1)  # sends 2 of 4
            assert poll(lambda: pool.task_counts()["completed"] == 2, timeout=30)
            # Another producer fills the pool: the map cannot send the rest.
            blockers = [pool.submit(wait_for_path, str(gate)) for _ in range(2)]
            assert next(results) == 0 and next(results) == 1  # ready in time: handed out
            with pytest.raises(ResultTimeoutError):
                next(results)
            assert 1.0 <= time.monotonic() - started < 30
            gate.touch()
            assert [b.result(timeout=30) for b in blockers] == [str(gate)] * 2
    finally:
        gate.touch()


def test_map_takes_a_timeout_of_centuries(pool: BaseWorkerPool) -> None:
    # Beyond threading.TIMEOUT_MAX (~292 years): waited for in steps.
    assert list(pool.map(square, range(3), timeout=1e12)) == [0, 1, 4]
    assert list(pool.map(square, range(3), timeout=1e12, chunksize=2)) == [0, 1, 4]


def test_map_on_a_bounded_pool_reads_an_unbounded_input_lazily() -> None:
    consumed = itertools.count()
    counter = iter(lambda: next(consumed), None)
    with BaseWorkerPool(2, max_pending=2) as pool:
        results = pool.map(square, counter, chunksize=1)
        first = list(itertools.islice(results, 10))
        assert first == [i * i for i in range(10)]
        # Read at most the pool's capacity (2 workers + 2 pending) ahead.
        assert next(consumed) <= 10 + 4
        results.close()  # type: ignore[attr-defined]


def test_map_reads_an_input_without_a_length_a_bounded_window_ahead() -> None:
    consumed = itertools.count()
    counter = iter(lambda: next(consumed), None)  # endless, and no len()
    with BaseWorkerPool(2) as pool:
        results = pool.map(square, counter)
        assert list(itertools.islice(results, 1000)) == [i * i for i in range(1000)]
        # (The input is read only by the iteration, on this thread: no wait needed.)
        # A window of chunks, each sized to ~10 ms of calls: far from endless.
        assert next(consumed) < 2_000_000
        results.close()  # type: ignore[attr-defined]
        assert next(consumed) < 2_000_000


def test_map_without_a_chunksize_cuts_a_sized_input_into_chunks(pool: BaseWorkerPool) -> None:
    before = pool.task_counts()["submitted"]
    assert list(pool.map(add, range(10_000), range(10_000))) == [2 * i for i in range(10_000)]
    tasks = pool.task_counts()["submitted"] - before
    assert 1 < tasks <= 2 * 16  # CHUNKS_PER_WORKER chunks per worker, not one task a call
    assert list(pool.map(square, range(10), chunksize=1)) == [i * i for i in range(10)]
    assert pool.task_counts()["submitted"] - before == tasks + 10


def test_map_of_a_sized_input_submits_eagerly_like_executor_map(pool: BaseWorkerPool) -> None:
    before = pool.task_counts()["submitted"]
    results = pool.map(square, list(range(30)), chunksize=1)
    # All submitted at the call, before iteration: a map nobody iterates still runs.
    assert pool.task_counts()["submitted"] - before == 30
    assert list(results) == [i * i for i in range(30)]


# -- workers --------------------------------------------------------------------


def test_all_max_size_workers_run_at_once_on_their_own(tmp_path: Path) -> None:
    with BaseWorkerPool(4) as pool:
        futures = [pool.submit(wait_for_count, str(tmp_path), "t", 4, 60) for _ in range(4)]
        pids = {f.result(timeout=90) for f in futures}
        assert len(pids) == 4


def test_only_granted_workers_run_at_once(tmp_path: Path) -> None:
    with BaseWorkerPool(4) as pool:
        assert pool.grant_workers(2) == 2 and pool.worker_count == 2
        pids = {f.result(timeout=60) for f in [pool.submit(getpid) for _ in range(20)]}
        assert len(pids) <= 2 and len(pool.worker_pids()) == 2
        assert pool.grant_workers(10) == 4
        futures = [pool.submit(wait_for_count, str(tmp_path), "t", 4, 60) for _ in range(4)]
        assert len({f.result(timeout=90) for f in futures}) == 4


def test_a_grant_wakes_a_submit_blocked_by_backpressure(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    with BaseWorkerPool(2, max_pending=0) as pool:
        pool.grant_workers(1)  # room for one task: the one running
        try:
            running = pool.submit(touch_and_wait, str(started), str(gate))
            assert poll(started.exists, timeout=30)
            second: list[Future[int]] = []
            submitter = threading.Thread(target=lambda: second.append(pool.submit(square, 3)))
            submitter.start()
            assert poll(lambda: pool._blocked_submits == 1, timeout=30)
            pool.grant_workers(1)  # a second worker: room for a second task, now
            submitter.join(timeout=30)
            assert not submitter.is_alive() and second[0].result(timeout=30) == 9
            assert not running.done()
        finally:
            gate.touch()
        assert isinstance(running.result(timeout=30), int)


def test_grants_never_exceed_max_size_under_concurrent_calls() -> None:
    with BaseWorkerPool(7) as pool:
        pool.grant_workers(0)
        start = threading.Barrier(20)

        def grant() -> None:
            start.wait()
            pool.grant_workers(3)

        threads = [threading.Thread(target=grant) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert pool.worker_count == 7


def test_a_bad_grant_names_its_own_argument() -> None:
    with BaseWorkerPool(2) as pool:
        with pytest.raises(ValueError, match="grant_workers: count must be >= 0, got -1"):
            pool.grant_workers(-1)
        with pytest.raises(TypeError, match="grant_workers: count"):
            pool.grant_workers(1.5)  # type: ignore[arg-type]
        assert pool.grant_workers(1) == 1  # (nothing changed by the refused calls)


def test_idle_workers_exit_and_come_back_on_demand() -> None:
    with BaseWorkerPool(2, idle_timeout=0.3) as pool:
        assert pool.submit(square, 2).result(timeout=60) == 4
        pids = pool.worker_pids()
        assert len(pids) == 1
        assert poll(lambda: not pool.worker_pids(), timeout=30)
        assert poll(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=30)
        assert pool.submit(square, 3).result(timeout=60) == 9
        assert len(pool.worker_pids()) == 1 and pool.worker_pids() != pids


# -- backpressure ---------------------------------------------------------------


def test_bounded_submit_blocks_while_workers_are_busy_and_the_queue_is_full(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(1, max_pending=1) as pool:
        first = pool.submit(wait_for_path, str(gate))
        second = pool.submit(square, 2)  # waits in the queue
        returned = threading.Event()

        def third() -> None:
            pool.submit(square, 3).result(timeout=60)
            returned.set()

        thread = threading.Thread(target=third)
        thread.start()
        assert not returned.wait(0.5)  # blocked: 1 busy worker + 1 pending
        gate.touch()
        assert returned.wait(60)
        thread.join()
        assert first.result() == str(gate) and second.result() == 4


def test_a_submit_blocked_on_a_full_pool_raises_when_the_pool_shuts_down(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    pool = BaseWorkerPool(1, max_pending=0)
    first = pool.submit(wait_for_path, str(gate))
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            pool.submit(square, 1)
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=blocked)
    thread.start()
    assert not errors
    closer = threading.Thread(target=pool.shutdown)
    closer.start()
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], PoolShutDownError)
    gate.touch()
    closer.join(60)
    assert first.result() == str(gate)


# -- durations beyond what the OS can wait --------------------------------------


@pytest.mark.timeout(60)
def test_an_idle_timeout_of_a_month_keeps_the_pool_working() -> None:
    # epoll waits at most ~24.8 days (int milliseconds): the I/O thread
    # waits for an idle worker's month in steps.
    pool = BaseWorkerPool(1, idle_timeout=timedelta(days=30))
    try:
        assert pool.submit(square, 2).result(timeout=30) == 4
        assert pool.submit(square, 3).result(timeout=30) == 9  # after its worker went idle
    finally:
        pool.shutdown()


# -- shutdown -------------------------------------------------------------------


def test_shutdown_wait_finishes_accepted_work_then_stops_the_workers() -> None:
    pool = BaseWorkerPool(2)
    futures = [pool.submit(square, i) for i in range(40)]
    pids = pool.worker_pids()
    pool.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(40)]
    assert pool.worker_pids() == []
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_shutdown_without_wait_returns_and_the_work_still_finishes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = BaseWorkerPool(1)
    future = pool.submit(wait_for_path, str(gate))
    pool.shutdown(wait=False)
    assert not future.done()
    gate.touch()
    assert future.result(timeout=60) == str(gate)
    pool.dispose(wait=True)  # joins what wait=False left running
    assert pool.worker_pids() == []


def test_shutdown_cancel_futures_cancels_only_work_not_started(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = BaseWorkerPool(1)
    running = pool.submit(touch_and_wait, str(started), str(gate))
    queued = [pool.submit(square, i) for i in range(20)]
    assert poll(started.exists)
    closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    assert poll(lambda: queued[-1].cancelled())
    gate.touch()
    closer.join(60)
    assert isinstance(running.result(), int)
    assert sum(f.cancelled() for f in queued) >= 10
    assert all(f.done() for f in queued)


def test_dispose_is_idempotent() -> None:
    pool = BaseWorkerPool(1)
    pool.submit(square, 1).result()
    pool.dispose()
    pool.dispose()
    pool.shutdown()
    assert pool.is_shut_down and pool.worker_pids() == []


# -- crashes --------------------------------------------------------------------


def test_a_dead_worker_fails_with_a_broken_executor_error_and_the_pool_heals() -> None:
    with BaseWorkerPool(2) as pool:
        crashed = pool.submit(exit_process, 7)
        error = crashed.exception(timeout=60)
        assert isinstance(error, WorkerLostError) and isinstance(error, WorkerPoolBrokenError)
        assert isinstance(error, BrokenProcessPool) and isinstance(error, BrokenExecutor)
        assert error.exitcode == 7 and f"worker process {error.pid} " in str(error)
        assert "exit code 7" in str(error)
        assert pool.submit(square, 5).result(timeout=60) == 25
        assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL from outside, Linux only")
def test_a_worker_killed_from_outside_heals_on_the_next_submit() -> None:
    with BaseWorkerPool(1) as pool:
        pid = pool.submit(getpid).result(timeout=60)
        psutil.Process(pid).kill()
        assert poll(lambda: pid not in pool.worker_pids(), timeout=30)

        # The next submit may race loky noticing the death; it must work soon.
        def works() -> bool:
            try:
                return pool.submit(square, 6).result(timeout=60) == 36
            except BrokenExecutor:
                return False

        assert poll(works, timeout=30)


def test_shutdown_from_a_future_callback_does_not_wait_for_itself() -> None:
    pool = BaseWorkerPool(1)
    called = threading.Event()

    def shut_down(_: object) -> None:
        pool.shutdown(wait=True)  # runs on the pool's I/O thread
        called.set()

    pool.submit(square, 3).add_done_callback(shut_down)
    assert called.wait(timeout=60)
    pool.shutdown(wait=True)  # from here it waits, and the workers are gone
    assert pool.worker_pids() == []


def test_a_pool_warmed_by_short_tasks_does_not_hand_out_long_ones_in_advance() -> None:
    with BaseWorkerPool(2) as pool:
        # Many tiny tasks: the pool learns they are short and sends them in batches.
        assert list(pool.map(square, range(500), chunksize=1)) == [i * i for i in range(500)]
        # A new kind of task (its run time unknown) goes one per worker: the
        # rest stay queued, so they can still be cancelled.
        slow = [pool.submit(sleep_and_return_pid, 0.5) for _ in range(6)]
        assert slow[-1].cancel() and slow[-2].cancel()
        pids = [f.result(timeout=60) for f in slow[:4]]
        assert len(set(pids)) == 2  # both workers took turns at them
