"""The loky engine's limits, with real workers: deadlines (``task_timeout``,
``submit_with_timeout``, per ``map`` call), ``kill_task``,
``max_tasks_per_worker`` and the memory limits. Each ends or retires only its
own slot (a one-worker loky executor), and no task runs twice.
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError, Future
from pathlib import Path

import psutil
import pytest

loky = pytest.importorskip("loky", reason="the loky extra is not installed")

from pool_manager import (  # noqa: E402
    TaskKilledError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
    WorkerPoolManager,
    _loky_watch,  # noqa: E402
)
from pool_manager.loky import LokyPoolFactory, LokyWorkerPool  # noqa: E402

from .helpers import (  # noqa: E402
    getpid,
    grow_until_stopped,
    hoard,
    learn_short,
    poll,
    run_step,
    runs_per_call,
    sleep_then_square,
    square,
    wait_for_path,
)

pytestmark = pytest.mark.timeout(90)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _handed(pool: LokyWorkerPool) -> list[int]:
    """How many tasks each slot holds now."""
    with pool._lock:
        return [len(slot.handed) for slot in pool._slots]


# -- deadlines -----------------------------------------------------------------------


def test_a_task_past_its_deadline_fails_and_only_its_worker_is_ended(tmp_path: Path) -> None:
    with LokyWorkerPool(2, task_timeout=1.0) as pool:
        assert pool.task_timeout == 1.0
        first = pool.submit(getpid).result(timeout=30)
        stuck = pool.submit(run_step, str(tmp_path), 0, "hang")  # (C code holding the GIL)
        assert poll(lambda: any(_handed(pool)), timeout=30)
        quick = [pool.submit(sleep_then_square, x, 0.01) for x in range(5)]
        with pytest.raises(TaskTimeoutError, match="past its 1s deadline") as timed_out:
            stuck.result(timeout=30)
        assert timed_out.value.timeout == 1.0
        assert poll(lambda: _gone(timed_out.value.pid), timeout=30)
        assert [future.result(timeout=30) for future in quick] == [x * x for x in range(5)]
        assert pool.submit(square, 9).result(timeout=30) == 81  # (the pool carries on)
        counts = pool.task_counts()
        assert counts["failed"] == 1 and counts["completed"] == 7
    assert first != timed_out.value.pid or _gone(first)
    assert runs_per_call(str(tmp_path)) == {0: 1}


def test_submit_with_timeout_sets_one_tasks_deadline_and_none_lifts_the_pools(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(2, task_timeout=0.5) as pool:
        unlimited = pool.submit_with_timeout(None, wait_for_path, str(gate))
        limited = pool.submit_with_timeout(0.5, wait_for_path, str(gate))
        with pytest.raises(TaskTimeoutError):
            limited.result(timeout=30)
        time.sleep(1.0)  # (well past the pool's 0.5 s: the unlimited task runs on)
        assert not unlimited.done()
        gate.touch()
        assert unlimited.result(timeout=30) == str(gate)
    with LokyWorkerPool(1) as pool, pytest.raises(ValueError):
        pool.submit_with_timeout(-1, square, 2)


def test_a_task_with_a_deadline_runs_alone_in_its_slot(tmp_path: Path) -> None:
    """No task waits behind one with a deadline in its slot, so ending its worker
    ends nothing else: the next task waits in the pool's queue, and runs once."""
    with LokyWorkerPool(1) as pool:
        stuck = pool.submit_with_timeout(1.0, run_step, str(tmp_path), 0, "hang")
        assert poll(lambda: _handed(pool) == [1], timeout=30)
        behind = pool.submit(run_step, str(tmp_path), 1)
        time.sleep(0.2)
        assert _handed(pool) == [1] and pool.task_counts()["queued"] == 1
        with pytest.raises(TaskTimeoutError):
            stuck.result(timeout=30)
        assert behind.result(timeout=30) == 1
    assert runs_per_call(str(tmp_path)) == {0: 1, 1: 1}


def test_with_a_deadline_map_gives_each_call_its_own(tmp_path: Path) -> None:
    actions = ["ok", "ok", "hang", "ok", "ok", "ok"]
    with LokyWorkerPool(2, task_timeout=1.0) as pool:
        outcomes = list(
            pool.map(
                run_step,
                [str(tmp_path)] * len(actions),
                range(len(actions)),
                actions,
                chunksize=10,  # (ignored: one call per task)
                return_exceptions=True,
            )
        )
    assert isinstance(outcomes[2], TaskTimeoutError)
    assert [outcome for x, outcome in enumerate(outcomes) if x != 2] == [0, 1, 3, 4, 5]
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(len(actions)), 1)


def test_the_watch_thread_runs_only_while_a_deadline_is_watched(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    assert _loky_watch.watching() is None
    with LokyWorkerPool(1, task_timeout=30) as pool:
        running = pool.submit(wait_for_path, str(gate))
        assert poll(lambda: _loky_watch.watching() is not None, timeout=30)
        gate.touch()
        assert running.result(timeout=30) == str(gate)
        assert poll(lambda: _loky_watch.watching() is None, timeout=10)  # (nothing due)


# -- kill_task -----------------------------------------------------------------------


def test_kill_task_ends_the_running_task_and_never_runs_another_twice(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(1) as pool:
        learn_short(pool, (wait_for_path, str(tmp_path)), (run_step, str(tmp_path), 0))
        running = pool.submit(wait_for_path, str(gate))
        assert poll(lambda: _handed(pool) == [1], timeout=30)
        behind = pool.submit(run_step, str(tmp_path), 1)  # (sent to the same slot: both short)
        assert poll(lambda: _handed(pool) == [2], timeout=30)
        queued = pool.submit(run_step, str(tmp_path), 2)
        (pid,) = pool.worker_pids()
        assert pool.kill_task(running)
        with pytest.raises(TaskKilledError, match="kill_task ended loky worker"):
            running.result(timeout=30)
        with pytest.raises(WorkerLostError, match="may have started"):
            behind.result(timeout=30)
        assert queued.result(timeout=30) == 2
        assert poll(lambda: _gone(pid), timeout=30)
        assert not pool.kill_task(queued)  # (finished)
    assert runs_per_call(str(tmp_path)).get(1, 0) <= 1 and runs_per_call(str(tmp_path))[2] == 1


def test_kill_task_cancels_a_queued_task_and_refuses_a_foreign_future(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(1) as pool:
        learn_short(pool, (wait_for_path, str(tmp_path)), (square, 0))
        running = pool.submit(wait_for_path, str(gate))
        pool.submit(square, 1)
        queued = pool.submit(square, 2)
        assert poll(lambda: _handed(pool) == [2], timeout=30)
        assert pool.kill_task(queued)
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        with pytest.raises(ValueError, match="this pool's submit"):
            pool.kill_task(Future())
        gate.touch()
        assert running.result(timeout=30) == str(gate)


# -- retiring slots ------------------------------------------------------------------


def test_idle_timeout_shuts_an_idle_slot_down_and_never_a_busy_one(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(1, idle_timeout=0.2) as pool:
        running = pool.submit(wait_for_path, str(gate))
        assert poll(lambda: pool.worker_pids() != [], timeout=30)
        (pid,) = pool.worker_pids()
        time.sleep(0.6)  # (busy for three idle timeouts: it stays)
        assert pool.worker_pids() == [pid] and not _gone(pid)
        gate.touch()
        assert running.result(timeout=30) == str(gate)
        # Idle now: shut down once the timeout passes, started again on demand.
        assert poll(lambda: pool.worker_pids() == [] and _gone(pid), timeout=30)
        assert pool.submit(getpid).result(timeout=60) != pid
    with pytest.raises(ValueError):
        LokyWorkerPool(1, idle_timeout=-1)


def test_a_manager_on_loky_passes_its_worker_idle_timeout() -> None:
    with (
        WorkerPoolManager(
            1, 600, 3600, engine="loky", worker_idle_timeout=0.2, memory_sample_interval=None
        ) as manager,
        manager.lease("a") as pool,
    ):
        pid = pool.submit(getpid).result(timeout=60)
        assert poll(lambda: pool.worker_pids() == [] and _gone(pid), timeout=30)


def test_max_tasks_per_worker_replaces_a_slot_between_tasks() -> None:
    with LokyPoolFactory(max_tasks_per_worker=2)(2) as pool:
        pids = [future.result(timeout=60) for future in [pool.submit(getpid) for _ in range(8)]]
        counts = pool.task_counts()
    assert max(pids.count(pid) for pid in set(pids)) <= 2 and len(set(pids)) >= 4
    assert counts["completed"] == 8 and counts["failed"] == 0


def test_a_slot_above_max_worker_memory_is_replaced_and_no_task_fails() -> None:
    with LokyWorkerPool(1, max_worker_memory="250MB") as pool:
        grown = pool.submit(hoard, 300).result(timeout=60)
        assert poll(lambda: _gone(grown), timeout=30)
        assert pool.submit(getpid).result(timeout=60) != grown
        assert pool.task_counts()["failed"] == 0


def test_a_worker_above_kill_worker_memory_is_ended_and_only_its_task_fails() -> None:
    with LokyWorkerPool(2, kill_worker_memory="300MB") as pool:
        runaway = pool.submit(grow_until_stopped)
        others = [pool.submit(sleep_then_square, x, 0.05) for x in range(6)]
        with pytest.raises(WorkerMemoryError, match="kill_worker_memory=300 MB") as over:
            runaway.result(timeout=60)
        assert over.value.size > over.value.limit == 300_000_000
        assert [future.result(timeout=60) for future in others] == [x * x for x in range(6)]
        assert poll(lambda: _gone(over.value.pid), timeout=30)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="kill_worker_memory must be above"):
        LokyWorkerPool(1, max_worker_memory="2GB", kill_worker_memory="1GB")
    with pytest.raises(ValueError):
        LokyWorkerPool(1, task_timeout=0)
    with pytest.raises(ValueError):
        LokyPoolFactory(max_tasks_per_worker=0)
    with pytest.raises(TypeError):
        LokyPoolFactory(max_worker_memory=[1])
