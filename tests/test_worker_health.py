"""Worker health: a crash costs one task, poison pickles cost one task, kill_task."""

from __future__ import annotations

import signal
from concurrent.futures import BrokenExecutor, CancelledError
from pathlib import Path

import pytest

from pool_manager import (
    ArgumentUnpicklingError,
    BaseWorkerPool,
    ResultUnpicklingError,
    TaskKilledError,
    TaskUnpicklingError,
    WorkerLostError,
    WorkerPoolBrokenError,
)

from .helpers import (
    LoadsNowhere,
    crash_initializer,
    exit_process,
    getpid,
    kill_self,
    poll,
    return_unloadable,
    sleep_then_square,
    square,
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
        assert set(pool.worker_pids()) == pids  # nothing broke: the same workers


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
        assert set(pool.worker_pids()) == pids


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
