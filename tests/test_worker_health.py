"""Worker health: a crash costs one task, poison pickles cost one task, kill_task."""

from __future__ import annotations

import concurrent.futures
import pickle
import signal
from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from pool_manager import (
    ArgumentUnpicklingError,
    BaseWorkerPool,
    PoolManagerError,
    ResultTimeoutError,
    ResultUnpicklingError,
    TaskKilledError,
    TaskTimeoutError,
    TaskUnpicklingError,
    WorkerLostError,
    WorkerMemoryError,
    WorkerPoolBrokenError,
)

from .helpers import (
    LoadsNowhere,
    crash_initializer,
    exit_process,
    getpid,
    grow_until_stopped,
    hoard,
    hold_the_gil,
    kill_self,
    poll,
    return_unloadable,
    sleep_and_return_pid,
    sleep_then_square,
    square,
    stop_self,
    touch_and_wait,
)


def test_a_crash_costs_exactly_the_task_that_crashed_200_tasks_5_crashes() -> None:
    crashing = {17, 60, 61, 120, 199}
    with BaseWorkerPool(4) as pool:
        futures = [
            pool.submit(exit_process, 3) if i in crashing else pool.submit(sleep_then_square, i)
            for i in range(200)
        ]
        failed = {i for i, f in enumerate(futures) if f.exception(timeout=120) is not None}
        assert failed == crashing
        for i in crashing:
            error = futures[i].exception()
            assert isinstance(error, WorkerLostError) and isinstance(error, BrokenExecutor)
            assert error.exitcode == 3 and error.pid is not None
        assert [futures[i].result() for i in range(200) if i not in crashing] == [
            i * i for i in range(200) if i not in crashing
        ]
        assert pool.submit(square, 12).result(timeout=60) == 144  # healed, no new pool


@pytest.mark.parametrize(
    ("signal_number", "name"),
    [
        (signal.SIGKILL, "SIGKILL"),
        (signal.SIGSEGV, "SIGSEGV"),
        (signal.SIGTERM, "SIGTERM"),
        (signal.SIGABRT, "SIGABRT"),
    ],
)
def test_a_worker_killed_by_a_signal_fails_only_its_task_naming_pid_and_signal(
    signal_number: int, name: str
) -> None:
    with BaseWorkerPool(2) as pool:
        others = [pool.submit(sleep_then_square, i, 0.02) for i in range(10)]
        doomed = pool.submit(kill_self, signal_number)
        more = [pool.submit(sleep_then_square, i, 0.02) for i in range(10, 20)]
        error = doomed.exception(timeout=120)
        assert isinstance(error, WorkerLostError)
        assert error.exitcode == -signal_number
        assert f"worker process {error.pid} died (killed by signal {name})" in str(error)
        assert [f.result(timeout=120) for f in others + more] == [i * i for i in range(20)]


def test_an_argument_that_fails_to_unpickle_in_the_worker_fails_only_its_task() -> None:
    with BaseWorkerPool(2) as pool:
        assert pool.submit(getpid).result(timeout=60)
        pids = set(pool.worker_pids())
        poisoned = pool.submit(square, LoadsNowhere("bad argument"))
        after = [pool.submit(square, i) for i in range(10)]
        error = poisoned.exception(timeout=60)
        assert isinstance(error, ArgumentUnpicklingError)
        assert isinstance(error, TaskUnpicklingError)
        assert "failed to unpickle in the worker" in str(error)
        assert "bad argument" in str(error) and "load_fails" in str(error.__cause__)
        assert [f.result(timeout=60) for f in after] == [i * i for i in range(10)]
        assert pids <= set(pool.worker_pids())  # nothing broke: the same workers live on


def test_a_result_that_fails_to_unpickle_in_the_parent_fails_only_its_task() -> None:
    with BaseWorkerPool(2) as pool:
        assert pool.submit(getpid).result(timeout=60)
        pids = set(pool.worker_pids())
        poisoned = pool.submit(return_unloadable, "bad result")
        after = [pool.submit(square, i) for i in range(10)]
        error = poisoned.exception(timeout=60)
        assert isinstance(error, ResultUnpicklingError)
        assert "failed to unpickle in the parent" in str(error)
        assert "bad result" in str(error)
        assert [f.result(timeout=60) for f in after] == [i * i for i in range(10)]
        assert pids <= set(pool.worker_pids())


def test_poison_pickles_are_caught_as_broken_process_pool_and_the_pool_runs_on() -> None:
    # Code written for ProcessPoolExecutor catches BrokenProcessPool for a poison
    # argument or result; here only that task fails, and the same pool runs on.
    with BaseWorkerPool(1) as pool:
        poisoned = [
            pool.submit(square, LoadsNowhere("bad argument")),
            pool.submit(return_unloadable, "bad result"),
        ]
        for future, kind in zip(poisoned, [ArgumentUnpicklingError, ResultUnpicklingError]):
            try:
                future.result(timeout=60)
            except BrokenProcessPool as error:
                assert isinstance(error, kind)
                assert isinstance(error, BrokenExecutor)
                assert isinstance(error, pickle.UnpicklingError)
            else:
                raise AssertionError("a poison pickle was not a BrokenProcessPool")
        assert pool.submit(square, 5).result(timeout=60) == 25


def test_the_timeout_errors_are_both_timeout_error_classes_on_every_version() -> None:
    # On 3.10 concurrent.futures.TimeoutError is a class of its own.
    for error_class in (TaskTimeoutError, ResultTimeoutError):
        assert issubclass(error_class, concurrent.futures.TimeoutError)
        assert issubclass(error_class, TimeoutError)
        assert issubclass(error_class, PoolManagerError)
    try:
        raise TaskTimeoutError("late", pid=1, timeout=0.5)
    except concurrent.futures.TimeoutError as error:
        assert isinstance(error, TimeoutError) and str(error) == "late"


def test_an_exception_that_cannot_be_pickled_is_described_instead() -> None:
    def raise_unpicklable() -> None:
        import threading

        error = ValueError("with a lock")
        error.lock = threading.Lock()  # type: ignore[attr-defined]
        raise error

    with BaseWorkerPool(1) as pool:
        error = pool.submit(raise_unpicklable).exception(timeout=60)
        assert isinstance(error, RuntimeError)
        assert "ValueError: with a lock" in str(error) and "could not be pickled" in str(error)
        assert pool.submit(square, 2).result(timeout=60) == 4


def test_kill_task_stops_a_running_task_and_only_that_task(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    with BaseWorkerPool(2) as pool:
        stuck = pool.submit(touch_and_wait, str(started), str(gate))
        assert poll(started.exists, timeout=60)
        others = [pool.submit(sleep_then_square, i) for i in range(20)]
        assert pool.kill_task(stuck)
        error = stuck.exception(timeout=60)
        assert isinstance(error, TaskKilledError) and isinstance(error, WorkerLostError)
        assert error.exitcode == -signal.SIGKILL
        assert [f.result(timeout=60) for f in others] == [i * i for i in range(20)]
        assert not pool.kill_task(others[0])  # already done
        gate.touch()


def test_kill_task_on_a_task_that_has_not_started_cancels_it(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    with BaseWorkerPool(1) as pool:
        running = pool.submit(touch_and_wait, str(started), str(gate))
        queued = [pool.submit(square, i) for i in range(10)]
        assert poll(started.exists, timeout=60)
        assert pool.kill_task(queued[-1])
        with pytest.raises((CancelledError, TaskKilledError)):
            queued[-1].result(timeout=60)
        gate.touch()
        assert isinstance(running.result(timeout=60), int)
        assert [f.result(timeout=60) for f in queued[:-1]] == [i * i for i in range(9)]
    with pytest.raises(ValueError, match="this pool"):
        BaseWorkerPool(1).kill_task(queued[0])


def test_workers_that_die_on_start_fail_the_tasks_instead_of_looping_forever() -> None:
    with BaseWorkerPool(1, initializer=crash_initializer) as pool:
        error = pool.submit(square, 1).exception(timeout=120)
        assert isinstance(error, WorkerPoolBrokenError)
        assert "before running any task" in str(error)


# -- recycling and limits ----------------------------------------------------------


@pytest.mark.parametrize("alias", ["max_tasks_per_worker", "max_tasks_per_child"])
def test_a_worker_is_replaced_after_max_tasks_and_no_task_fails(alias: str) -> None:
    with BaseWorkerPool(1, **{alias: 3}) as pool:  # type: ignore[arg-type]
        pids = [pool.submit(getpid).result(timeout=60) for _ in range(9)]
    assert pids[0:3] == [pids[0]] * 3
    assert pids[3:6] == [pids[3]] * 3
    assert pids[6:9] == [pids[6]] * 3
    assert len({pids[0], pids[3], pids[6]}) == 3


def test_max_tasks_of_one_gives_every_task_a_fresh_worker() -> None:
    with BaseWorkerPool(2, max_tasks_per_worker=1) as pool:
        futures = [pool.submit(getpid) for _ in range(8)]
        pids = [f.result(timeout=60) for f in futures]
    assert len(set(pids)) == 8


def test_a_worker_above_max_worker_memory_is_replaced_after_its_task() -> None:
    with BaseWorkerPool(1, max_worker_memory="150MB") as pool:
        first = pool.submit(hoard, 10).result(timeout=60)
        assert pool.submit(getpid).result(timeout=60) == first  # still small
        grown = pool.submit(hoard, 250).result(timeout=60)  # succeeds...
        assert grown == first
        after = pool.submit(getpid).result(timeout=60)  # ...then the worker is replaced
        assert after != first


def test_a_worker_above_kill_worker_memory_is_ended_and_only_its_task_fails() -> None:
    with BaseWorkerPool(2, kill_worker_memory="300MB") as pool:
        others = [pool.submit(sleep_then_square, i, 0.05) for i in range(10)]
        runaway = pool.submit(grow_until_stopped)
        error = runaway.exception(timeout=120)
        assert isinstance(error, WorkerMemoryError) and isinstance(error, WorkerLostError)
        assert error.limit == 300_000_000 and error.size > error.limit
        assert "kill_worker_memory=300.0 MB" in str(error)
        assert [f.result(timeout=60) for f in others] == [i * i for i in range(10)]
        assert pool.submit(square, 3).result(timeout=60) == 9


def test_a_task_past_its_deadline_fails_with_task_timeout_error_and_others_finish() -> None:
    with BaseWorkerPool(2, task_timeout=0.5) as pool:
        others = [pool.submit(sleep_then_square, i, 0.01) for i in range(10)]
        stuck = pool.submit(sleep_and_return_pid, 60)
        error = stuck.exception(timeout=60)
        assert isinstance(error, TaskTimeoutError) and isinstance(error, TimeoutError)
        assert isinstance(error, concurrent.futures.TimeoutError)  # a class of its own on 3.10
        assert error.timeout == 0.5 and "0.5s deadline" in str(error)
        assert [f.result(timeout=60) for f in others] == [i * i for i in range(10)]
        assert pool.submit(square, 4).result(timeout=60) == 16


def test_submit_with_timeout_sets_a_deadline_per_call_from_when_the_task_starts() -> None:
    with BaseWorkerPool(1) as pool:
        blocker = pool.submit(sleep_and_return_pid, 1.0)
        # Queued behind a 1 s task: its 0.6 s deadline starts when it starts.
        patient = pool.submit_with_timeout(0.6, sleep_and_return_pid, 0.05)
        late = pool.submit_with_timeout(0.3, sleep_and_return_pid, 30)
        assert isinstance(blocker.result(timeout=60), int)
        assert isinstance(patient.result(timeout=60), int)
        assert isinstance(late.exception(timeout=60), TaskTimeoutError)
        no_deadline = pool.submit_with_timeout(None, sleep_and_return_pid, 0.05)
        assert isinstance(no_deadline.result(timeout=60), int)


# The hard limits hold from outside the worker: a task that holds the GIL
# (one long C call) or a stopped worker runs no thread of its own. These pools
# end with terminate() in `finally`: were a limit not enforced, a graceful
# shutdown would wait for the stuck worker.


def test_a_task_holding_the_gil_past_its_deadline_is_ended_from_outside() -> None:
    pool = BaseWorkerPool(1, task_timeout=0.5)
    try:
        stuck = pool.submit(hold_the_gil)
        error = stuck.exception(timeout=60)
        assert isinstance(error, TaskTimeoutError) and error.timeout == 0.5
        assert pool.submit(square, 5).result(timeout=60) == 25  # a fresh worker
    finally:
        pool.terminate()


def test_a_stopped_worker_is_ended_at_its_task_deadline_and_shutdown_returns() -> None:
    pool = BaseWorkerPool(1)
    try:
        stopped = pool.submit_with_timeout(0.5, stop_self)
        assert isinstance(stopped.exception(timeout=60), TaskTimeoutError)
        assert pool.submit(square, 6).result(timeout=60) == 36
        pool.shutdown(wait=True)
    finally:
        pool.terminate()


def test_memory_grown_inside_one_c_call_is_caught_by_kill_worker_memory() -> None:
    pool = BaseWorkerPool(1, kill_worker_memory="200MB")
    try:
        error = pool.submit(hold_the_gil, 300).exception(timeout=60)
        assert isinstance(error, WorkerMemoryError) and error.size > 200_000_000
        assert pool.submit(square, 7).result(timeout=60) == 49
    finally:
        pool.terminate()


@pytest.mark.parametrize("round_", range(3))
def test_a_task_that_finishes_as_its_deadline_passes_either_returns_or_times_out(
    round_: int,
) -> None:
    # The result and the deadline race: each task either returns its result
    # or fails with TaskTimeoutError, nothing else, and every task settles
    # (the tasks queued behind one that timed out run on a fresh worker).
    with BaseWorkerPool(2, task_timeout=0.1) as pool:
        futures = [pool.submit(sleep_then_square, i, 0.09 + 0.0025 * (i % 9)) for i in range(36)]
        concurrent.futures.wait(futures, timeout=110)
        for i, future in enumerate(futures):
            assert future.done()
            error = future.exception()
            if error is None:
                assert future.result() == i * i
            else:
                assert isinstance(error, TaskTimeoutError), error


def test_limit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="above max_worker_memory"):
        BaseWorkerPool(1, max_worker_memory="1GB", kill_worker_memory="500MB")
    with pytest.raises(ValueError, match="512XB"):
        BaseWorkerPool(1, max_worker_memory="512XB")
    with pytest.raises(TypeError):
        BaseWorkerPool(1, max_worker_memory=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not both"):
        BaseWorkerPool(1, max_tasks_per_worker=2, max_tasks_per_child=2)
    with pytest.raises(ValueError):
        BaseWorkerPool(1, max_tasks_per_worker=0)
    with pytest.raises(ValueError):
        BaseWorkerPool(1, task_timeout=-1)
    with BaseWorkerPool(1) as pool, pytest.raises(ValueError):
        pool.submit_with_timeout(0, square, 1)
