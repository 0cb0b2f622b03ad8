"""The loky engine: each key's pool as one-worker loky executors (slots), with real workers.

loky starts a resource tracker process of its own the first time a worker
starts, and keeps it (and the descriptor to it) for the rest of the
interpreter, as multiprocessing does its own: ``conftest.py`` starts both
before the first test's leak baseline is taken. Nothing else of loky
outlives a disposed pool: its executors' threads are joined and its
workers reaped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, CancelledError, Future
from pathlib import Path

import psutil
import pytest

loky = pytest.importorskip("loky", reason="the loky extra is not installed")

from pool_manager import (  # noqa: E402
    ArgumentUnpicklingError,
    BaseWorkerPool,
    PoolShutDownError,
    PoolTerminatedError,
    ResultUnpicklingError,
    WorkerLostError,
    WorkerPool,
    WorkerPoolBrokenError,
    WorkerPoolManager,
    WorkerStartError,
)
from pool_manager._queued import QueuedPool  # noqa: E402
from pool_manager.loky import LokyPoolFactory, LokyWorkerPool  # noqa: E402

from .helpers import (  # noqa: E402
    FakeClock,
    LoadsNowhere,
    add,
    crash_initializer,
    exit_process,
    fail_at,
    getpid,
    learn_short,
    most_at_once,
    poll,
    raise_value_error,
    record_interval,
    return_unloadable,
    run_scripted,
    run_step,
    runs_per_call,
    sleep_then_square,
    square,
    wait_for_path,
    wait_then_square,
)

STALE = 60.0
LIFETIME = 600.0
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pool() -> Iterator[LokyWorkerPool]:
    pool = LokyWorkerPool(2)
    try:
        yield pool
    finally:
        pool.terminate()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- tasks -----------------------------------------------------------------------


def test_results_exceptions_kwargs_and_closures_come_back(pool: LokyWorkerPool) -> None:
    assert isinstance(pool, WorkerPool) and isinstance(pool, QueuedPool)
    assert pool.submit(square, 7).result(timeout=30) == 49
    assert pool.submit(add, 2, y=3).result(timeout=30) == 5
    offset = 40
    assert pool.submit(lambda x: x + offset, 2).result(timeout=30) == 42  # cloudpickled
    with pytest.raises(ValueError, match="boom") as raised:
        pool.submit(raise_value_error, "boom").result(timeout=30)
    # The worker's traceback comes along as the cause, as in ProcessPoolExecutor.
    assert "raise_value_error" in str(raised.value.__cause__)
    counts = pool.task_counts()
    assert counts["completed"] == 3 and counts["failed"] == 1 and counts["running"] == 0


def test_worker_pids_are_live_loky_workers_of_this_process(pool: LokyWorkerPool) -> None:
    pids = {pool.submit(getpid).result(timeout=30) for _ in range(4)}
    assert pids <= set(pool.worker_pids()) and 1 <= len(pool.worker_pids()) <= 2
    children = {child.pid for child in psutil.Process().children()}
    for pid in pool.worker_pids():
        assert pid in children and _alive(pid)
        assert "loky" in " ".join(psutil.Process(pid).cmdline())
    pool.dispose()
    assert pool.worker_pids() == []
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("context", ["loky", "loky_init_main"])
def test_workers_are_loky_own_when_joblib_has_put_its_copy_of_loky_in_place(
    context: str,
) -> None:
    # Importing joblib puts its vendored loky's contexts in multiprocessing's
    # registry under the same names; the engine's workers must stay loky's
    # (not start, nor be tracked, by joblib's copy).
    pytest.importorskip("joblib.externals.loky", reason="joblib is not installed")
    with LokyWorkerPool(1, context=context) as pool:
        pool.submit(abs, -1).result(timeout=60)
        (pid,) = pool.worker_pids()
        command = " ".join(psutil.Process(pid).cmdline())
    assert "loky.backend.popen_loky_posix" in command
    assert "joblib" not in command


def test_wait_and_as_completed_see_the_futures_finish(pool: LokyWorkerPool, tmp_path: Path) -> None:
    # (CPython's own wait/as_completed tests run on this engine in make test-all.)
    gate = tmp_path / "gate"
    slow = pool.submit(wait_then_square, str(gate), 3)
    quick = pool.submit(square, 4)
    done, not_done = concurrent.futures.wait(
        [slow, quick], timeout=30, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {quick} and not_done == {slow}
    failing = pool.submit(raise_value_error, "no")
    done, _ = concurrent.futures.wait(
        [slow, failing], timeout=30, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    assert done == {failing}
    with pytest.raises(concurrent.futures.TimeoutError):
        next(concurrent.futures.as_completed([slow], timeout=0.1))
    gate.touch()
    finished = list(concurrent.futures.as_completed([slow, quick, failing], timeout=30))
    assert set(finished) == {slow, quick, failing} and slow.result() == 9


def test_an_unpicklable_argument_fails_only_its_task(pool: LokyWorkerPool) -> None:
    poison = pool.submit(square, threading.Lock())
    others = [pool.submit(square, i) for i in range(5)]
    assert isinstance(poison.exception(timeout=30), Exception)
    assert [f.result(timeout=30) for f in others] == [i * i for i in range(5)]
    assert pool.task_counts()["failed"] == 1


def test_poison_that_loads_nowhere_fails_only_its_own_task(pool: LokyWorkerPool) -> None:
    # An argument that fails to load in the worker, and a result that fails
    # to load here: loky ends the slot's worker for each; only that task fails.
    bad_argument = pool.submit(repr, LoadsNowhere("no argument here"))
    error = bad_argument.exception(timeout=60)
    assert isinstance(error, ArgumentUnpicklingError)  # (as on the fork server)
    assert "RuntimeError: no argument here" in str(error.__cause__.__cause__)
    bad_result = pool.submit(return_unloadable, "no result here")
    error = bad_result.exception(timeout=60)
    assert isinstance(error, ResultUnpicklingError) and isinstance(error, BrokenExecutor)
    assert "RuntimeError: no result here" in str(error.__cause__.__cause__)
    others = [pool.submit(square, i) for i in range(5)]
    assert [f.result(timeout=60) for f in others] == [i * i for i in range(5)]
    assert pool.task_counts()["failed"] == 2


# -- map -------------------------------------------------------------------------


def test_map_returns_results_in_order(pool: LokyWorkerPool) -> None:
    assert list(pool.map(square, range(100))) == [i * i for i in range(100)]
    assert list(pool.map(square, range(10), chunksize=1)) == [i * i for i in range(10)]
    assert list(pool.map(add, range(30), range(100), chunksize=7)) == [2 * i for i in range(30)]
    assert list(pool.map(square, (i for i in range(50)))) == [i * i for i in range(50)]
    assert list(pool.map(square, [])) == []
    with pytest.raises(ValueError):
        pool.map(square, range(3), chunksize=0)
    results = pool.map(functools.partial(fail_at, bad=13), range(40), chunksize=4)
    got = []
    with pytest.raises(ValueError, match="bad item 13"):
        for result in results:
            got.append(result)
    assert got == list(range(13))  # every result before the failing call
    assert pool.unfinished_maps == 0


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_with_return_exceptions_yields_every_calls_outcome(
    pool: LokyWorkerPool, tmp_path: Path, chunksize: int
) -> None:
    actions = ["ok"] * 12
    actions[0] = actions[5] = "raise"
    step = functools.partial(run_scripted, str(tmp_path), tuple(actions))
    results = list(pool.map(step, range(12), chunksize=chunksize, return_exceptions=True))
    for x, result in enumerate(results):
        if actions[x] == "raise":
            assert isinstance(result, ValueError) and str(result) == f"call {x} raised"
        else:
            assert result == x
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(12), 1)


# -- the cap, backpressure, cancel ---------------------------------------------------


def test_never_more_tasks_at_once_than_max_size(tmp_path: Path) -> None:
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    runs.mkdir()
    with LokyWorkerPool(2) as pool:
        futures = [pool.submit(record_interval, str(runs), str(gate)) for _ in range(8)]
        assert poll(lambda: len(os.listdir(runs)) == 2, timeout=30)
        time.sleep(0.3)  # (a third would have started by now)
        assert len(os.listdir(runs)) == 2 and len(pool.worker_pids()) == 2
        counts = pool.task_counts()
        assert counts["running"] == 2 and counts["queued"] == 6
        gate.touch()
        assert len({f.result(timeout=30) for f in futures}) <= 2
    assert most_at_once(str(runs)) == 2


def test_a_grant_below_the_slots_shuts_the_idle_ones_down(tmp_path: Path) -> None:
    with LokyWorkerPool(3) as pool:
        assert list(pool.map(square, range(3), chunksize=1)) == [0, 1, 4]
        assert poll(lambda: len(pool.worker_pids()) == 3, timeout=30)
        workers = pool.worker_pids()
        assert pool.grant_workers(1) == 1 and pool.worker_count == 1
        assert poll(lambda: len(pool.worker_pids()) == 1, timeout=30)
        assert poll(lambda: sum(_alive(pid) for pid in workers) == 1, timeout=30)
        runs = tmp_path / "runs"
        runs.mkdir()
        (tmp_path / "gate").touch()
        futures = [
            pool.submit(record_interval, str(runs), str(tmp_path / "gate")) for _ in range(4)
        ]
        assert all(isinstance(f.result(timeout=30), int) for f in futures)
        assert most_at_once(str(runs)) == 1


def test_a_queued_task_can_be_cancelled_and_a_running_one_cannot(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(1) as pool:
        running = pool.submit(wait_for_path, str(gate))  # (handed to the slot as it starts)
        assert pool.task_counts()["running"] == 1 and not running.cancel()
        assert poll(lambda: pool.worker_pids() != [], timeout=30)  # (the slot is ready)
        # Behind a task of a kind not yet known to be short, nothing waits in
        # its slot: the next tasks stay queued, and cancellable.
        second = pool.submit(square, 3)
        queued = pool.submit(square, 4)
        assert queued.cancel() and queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        assert not running.cancel() and pool.task_counts()["running"] == 1
        gate.touch()
        assert running.result(timeout=30) == str(gate) and second.result(timeout=30) == 9
        counts = pool.task_counts()
        assert counts["cancelled"] == 1 and counts["completed"] == 2


def test_a_task_handed_to_a_starting_slot_is_running_as_in_the_call_queue() -> None:
    """As ``ProcessPoolExecutor`` puts tasks in its call queue before its workers
    are up: the first task of each starting slot runs, even past a
    ``shutdown(cancel_futures=True)`` that cancels the rest."""
    pool = LokyWorkerPool(2)
    futures = [pool.submit(sleep_then_square, x, 0.05) for x in range(20)]
    assert pool.worker_pids() == [] and pool.task_counts()["running"] == 2
    pool.shutdown(cancel_futures=True)
    assert [f.result(timeout=0) for f in futures[:2]] == [0, 1]
    assert all(f.cancelled() for f in futures[2:])


def test_an_answer_settled_on_the_callers_thread_leaves_it_under_backpressure() -> None:
    """An answer loky already has is settled at once, on the thread that sends
    the task: its done-callbacks' submits are never held there, but only while
    it settles (else that thread's later submits would skip ``max_pending``)."""
    from pool_manager import _threads
    from pool_manager._loky_slots import _settling_here

    assert not _threads.must_not_stall()
    with _settling_here():
        assert _threads.must_not_stall()
    assert not _threads.must_not_stall()


def test_submit_blocks_while_the_pool_is_full(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = LokyPoolFactory(max_pending=1)(1)  # 1 running + 1 pending
    try:
        first = pool.submit(wait_for_path, str(gate))
        second = pool.submit(square, 2)
        third: list[Future[int]] = []
        submitter = threading.Thread(target=lambda: third.append(pool.submit(square, 3)))
        submitter.start()
        assert poll(lambda: pool._blocked_submits == 1, timeout=30)
        assert not third and pool.unfinished_tasks == 2
        gate.touch()
        submitter.join(timeout=30)
        assert third and third[0].result(timeout=30) == 9
        assert first.result(timeout=30) == str(gate) and second.result(timeout=30) == 4
    finally:
        gate.touch()
        pool.dispose()


def test_a_done_callback_can_submit_to_a_full_pool(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with LokyWorkerPool(1, max_pending=0) as pool:
        first = pool.submit(wait_then_square, str(gate), 2)
        follow_ups: list[Future[int]] = []
        first.add_done_callback(
            lambda _: follow_ups.extend(pool.submit(square, x) for x in range(3))
        )
        gate.touch()
        assert poll(lambda: len(follow_ups) == 3, timeout=30)
        assert [f.result(timeout=30) for f in follow_ups] == [0, 1, 4]


# -- crashes and orphans -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tasks_that_kill_their_worker_fail_alone_and_nothing_runs_twice(tmp_path: Path) -> None:
    actions = ["ok"] * 200
    for x in (3, 50, 51, 120, 199):
        actions[x] = "exit"
    with LokyWorkerPool(2) as pool:
        futures = [
            pool.submit(run_step, str(tmp_path), x, action) for x, action in enumerate(actions)
        ]
        for x, future in enumerate(futures):
            if actions[x] == "exit":
                with pytest.raises(WorkerLostError, match="died while running this task") as lost:
                    future.result(timeout=60)
                assert isinstance(lost.value.__cause__, loky.BrokenProcessPool)
            else:
                assert future.result(timeout=60) == x
        counts = pool.task_counts()
        assert counts["failed"] == 5 and counts["completed"] == 195
        assert pool.submit(square, 9).result(timeout=30) == 81  # the pool carries on
    assert runs_per_call(str(tmp_path)) == dict.fromkeys(range(200), 1)


def test_a_worker_killed_while_idle_costs_no_task(pool: LokyWorkerPool) -> None:
    assert pool.submit(square, 2).result(timeout=30) == 4
    (worker,) = pool.worker_pids()
    os.kill(worker, signal.SIGKILL)
    assert poll(lambda: not _alive(worker), timeout=30)
    # loky notices the death at once, in its manager thread; a task handed to
    # the slot in the moment before would fail with WorkerLostError unrun.
    time.sleep(0.2)
    assert [pool.submit(square, i).result(timeout=30) for i in range(3)] == [0, 1, 4]
    assert pool.task_counts()["failed"] == 0 and worker not in pool.worker_pids()


def test_a_failing_initializer_fails_the_queued_tasks_after_three_workers() -> None:
    with LokyWorkerPool(1, initializer=raise_value_error, initargs=("no model",)) as pool:
        with pytest.raises(WorkerPoolBrokenError, match="initializer failed in 3 loky") as broken:
            pool.submit(square, 2).result(timeout=60)
        assert "ValueError: no model" in str(broken.value)
    ended = pytest.raises(WorkerPoolBrokenError, match="ended before they were ready")
    with LokyWorkerPool(1, initializer=crash_initializer) as pool, ended:  # (it ends the worker)
        pool.submit(square, 2).result(timeout=60)


PARENT = textwrap.dedent(
    """
    import json, time
    from pool_manager.loky import LokyWorkerPool

    pool = LokyWorkerPool(2)
    assert list(pool.map(time.sleep, [0.3, 0.3], chunksize=1)) == [None, None]
    busy = pool.submit(time.sleep, 600)  # a worker is mid-task when the parent dies
    print(json.dumps(pool.worker_pids()), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and getppid semantics: Linux")
def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    descendants: list[int] = []
    try:
        assert parent.stdout is not None
        workers = json.loads(parent.stdout.readline())
        descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert len(workers) == 2 and set(workers) <= set(descendants)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        parent.stdout.close()  # type: ignore[union-attr]
    gone = poll(lambda: not any(_alive(pid) for pid in workers), timeout=5)
    left = [pid for pid in descendants if _alive(pid)]
    poll(lambda: not any(_alive(pid) for pid in descendants), timeout=10)  # (loky's tracker)
    for pid in descendants:  # never leave them running, whatever happened
        if _alive(pid):
            psutil.Process(pid).kill()
    assert gone, f"workers still alive 5 s after their parent was killed: {left}"


# -- dispose, terminate, the manager -------------------------------------------------


def test_dispose_waits_for_accepted_work_and_the_workers(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = LokyWorkerPool(2)
    futures = [pool.submit(wait_then_square, str(gate), i) for i in range(5)]
    assert poll(lambda: len(pool.worker_pids()) == 2, timeout=30)
    workers = pool.worker_pids()
    threading.Timer(0.3, gate.touch).start()
    pool.dispose()
    assert all(f.done() for f in futures) and [f.result() for f in futures] == [0, 1, 4, 9, 16]
    assert pool.is_shut_down and not any(_alive(pid) for pid in workers)
    with pytest.raises(PoolShutDownError):
        pool.submit(square, 1)
    pool.dispose()  # idempotent


def test_terminate_fails_running_tasks_and_cancels_the_queue(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = LokyWorkerPool(1)
    learn_short(pool, (wait_for_path, str(tmp_path)), (square, 1))
    running = pool.submit(wait_for_path, str(gate))
    assert poll(lambda: pool.worker_pids() != [], timeout=30)  # (its slot is ready)
    (worker,) = pool.worker_pids()
    handed = pool.submit(square, 2)  # in loky's call queue (both kinds are short)
    assert poll(handed.running, timeout=30)
    queued = [pool.submit(square, i) for i in range(3)]
    pool.terminate()
    assert all(f.cancelled() for f in queued)
    for future in (running, handed):
        with pytest.raises(PoolTerminatedError):
            future.result(timeout=0)
    assert not _alive(worker) and pool.unfinished_tasks == 0
    pool.terminate()  # idempotent


def test_a_manager_with_the_loky_factory_expires_an_idle_pool() -> None:
    clock = FakeClock()
    factory = LokyPoolFactory()
    with WorkerPoolManager(2, STALE, LIFETIME, clock=clock, memory_sample_interval=None) as manager:
        with manager.lease("a", 2, factory=factory) as pool:
            assert isinstance(pool, LokyWorkerPool) and pool.max_pending == 2
            assert pool.submit(square, 7).result(timeout=30) == 49
            assert list(pool.map(square, range(10), chunksize=5)) == [i * i for i in range(10)]
            workers = pool.worker_pids()
        assert manager.stats()["pools"]["a"]["tasks"]["completed"] == 3
        clock.advance(STALE)
        assert manager.sweep().expired == ["a"]
        assert pool.is_shut_down and "a" not in manager
        assert not any(_alive(pid) for pid in workers)
        with manager.lease("a", 2, factory=factory) as fresh:  # the next use builds a new pool
            assert fresh is not pool and fresh.submit(square, 5).result(timeout=30) == 25


def test_a_manager_on_loky_serves_asyncio_and_samples_its_workers_memory() -> None:
    async def main(manager: WorkerPoolManager) -> list[int]:
        async with manager.lease_async("a", send_size=2) as pool:
            assert isinstance(pool, LokyWorkerPool)
            return list(await asyncio.gather(*(pool.run(square, i) for i in range(10))))

    with WorkerPoolManager(2, STALE, LIFETIME, engine="loky", memory_sample_interval=0.05) as m:
        assert asyncio.run(main(m)) == [i * i for i in range(10)]
        (stats,) = m.stats()["pools"].values()
        assert poll(lambda: set(m.stats()["pools"]["a"]["memory"]) == set(stats["worker_pids"]))
        assert m.stats()["pools"]["a"]["memory_rss"] > 0


def test_the_loky_pool_shares_the_queued_base() -> None:
    shared = ["grant_workers", "task_counts", "shutdown", "_admit", "_cancel", "_settle"]
    below = LokyWorkerPool.__mro__[: LokyWorkerPool.__mro__.index(QueuedPool)]
    assert [name for cls in below for name in shared if name in vars(cls)] == []


# -- arguments and packaging ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_accepted_tasks_finish_at_exit(tmp_path: Path) -> None:
    """As ``ProcessPoolExecutor``'s: a program that ends without ``shutdown`` runs
    what it submitted first (the queued tasks go to the ready workers: loky
    cannot start one as the interpreter exits)."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from pool_manager.loky import LokyWorkerPool

            def say(word, seconds):
                time.sleep(seconds)
                print(word, flush=True)

            if __name__ == "__main__":
                warm = LokyWorkerPool(2)
                warm.submit(say, "warm", 0).result()
                for word in ("apple", "banana", "cherry"):
                    warm.submit(say, word, 0.5)
            """
        )
    )
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(completed.stdout.split()) == ["apple", "banana", "cherry", "warm"]


def test_as_the_interpreter_exits_a_pool_with_no_worker_fails_its_tasks() -> None:
    """No slot can start then: the task fails with `WorkerStartError`, never lost."""
    pool = LokyWorkerPool(1)
    pool._exiting = True  # (as the exit hook sets it)
    future = pool.submit(square, 2)
    with pytest.raises(WorkerStartError, match="the interpreter is exiting"):
        future.result(timeout=30)
    assert pool.worker_pids() == []
    pool.dispose()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        LokyWorkerPool(0)
    with pytest.raises(ValueError, match="context must be one of"):
        LokyWorkerPool(1, context="fork")
    with pytest.raises(ValueError, match="env needs"):
        LokyWorkerPool(1, context="spawn", env={"A": "1"})
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        LokyWorkerPool(1, shared_data=threading.Lock())
    with pytest.raises(TypeError, match="picklable"):
        LokyPoolFactory(initargs=(threading.Lock(),))
    with pytest.raises(ValueError):
        LokyPoolFactory(max_pending=-1)
    with LokyWorkerPool(1) as pool, pytest.raises(TypeError, match="callable"):
        pool.submit(42)  # type: ignore[arg-type]


def test_env_and_initializer_reach_the_workers(tmp_path: Path) -> None:
    env = {"POOL_MANAGER_LOKY_TEST": "yes"}
    with LokyWorkerPool(1, env=env, initializer=os.chdir, initargs=(str(tmp_path),)) as pool:
        assert pool.submit(os.getenv, "POOL_MANAGER_LOKY_TEST").result(timeout=30) == "yes"
        assert pool.submit(os.getcwd).result(timeout=30) == str(tmp_path)
        # Started from a pool_manager thread (which blocks SIGTERM), the worker still takes it.
        (worker,) = pool.worker_pids()
        os.kill(worker, signal.SIGTERM)
        assert poll(lambda: not _alive(worker), timeout=30)
        time.sleep(0.2)  # (loky notices the death: see the test below)
        assert pool.submit(square, 3).result(timeout=30) == 9


def test_without_loky_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "loky", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pool_manager.loky")
    with pytest.raises(ImportError, match=r"pool-manager\[loky\]"):
        importlib.import_module("pool_manager.loky")


def test_the_core_package_never_imports_loky() -> None:
    code = (
        "import sys, pool_manager, pool_manager.manager, pool_manager.pool; "
        "from pool_manager import WorkerPoolManager, BaseWorkerPool; "
        "assert 'loky' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert issubclass(LokyWorkerPool, QueuedPool) and not issubclass(LokyWorkerPool, BaseWorkerPool)
    _ = exit_process  # (the crash tests use run_step's "exit")
