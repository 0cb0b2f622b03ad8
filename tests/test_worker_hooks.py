"""A worker's index in its pool (`pool_manager.worker_index`) and the pool's
``finalizer``, run as a worker leaves cleanly: on both engines."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pool_manager import BaseWorkerPool, WorkerLostError, worker_index
from pool_manager.errors import TaskTimeoutError
from pool_manager.pool import WorkerPool

from .helpers import wait_for_path


@pytest.fixture(params=["fork_server", "loky"])
def make_pool(request: pytest.FixtureRequest) -> Any:
    """Builds a pool of the parametrized engine."""
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool
    return BaseWorkerPool


# -- what the workers run ------------------------------------------------------

_initialized_index: int | None = None


def remember_index() -> None:
    global _initialized_index
    _initialized_index = worker_index()


def index_seen_by_initializer() -> tuple[int, int | None]:
    return os.getpid(), _initialized_index


def index_and_pid() -> tuple[int, int]:
    return worker_index(), os.getpid()


def index_when_all_started(folder: str, count: int) -> tuple[int, int]:
    """Mark this worker started, then wait until ``count`` have: each task holds its own worker."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the other tasks never started")
        time.sleep(0.005)
    return worker_index(), os.getpid()


def write_farewell(folder: str) -> None:
    """The finalizer: one file per worker that leaves cleanly, named by its pid and index."""
    Path(folder, f"{os.getpid()}-{worker_index()}").touch()


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def die() -> None:
    os._exit(3)


def farewells(folder: Path) -> dict[int, int]:
    """pid -> index of each worker whose finalizer ran."""
    found = {}
    for name in os.listdir(folder):
        pid, index = name.split("-")
        found[int(pid)] = int(index)
    return found


# -- worker_index --------------------------------------------------------------


@pytest.mark.timeout(90)
def test_each_busy_worker_has_its_own_index_below_max_size(make_pool: Any, tmp_path: Path) -> None:
    with make_pool(3) as pool:
        futures = [pool.submit(index_when_all_started, str(tmp_path), 3) for _ in range(3)]
        seen = [future.result(timeout=60) for future in futures]
    assert sorted(index for index, _ in seen) == [0, 1, 2]
    assert len({pid for _, pid in seen}) == 3


@pytest.mark.timeout(90)
def test_a_replacement_takes_the_index_its_predecessor_left(make_pool: Any) -> None:
    # One task per worker: every task runs in a new worker, always the pool's only one.
    with make_pool(1, max_tasks_per_worker=1) as pool:
        seen = [pool.submit(index_and_pid).result(timeout=60) for _ in range(3)]
    assert [index for index, _ in seen] == [0, 0, 0]
    assert len({pid for _, pid in seen}) == 3


@pytest.mark.timeout(90)
def test_the_initializer_sees_the_workers_index(make_pool: Any) -> None:
    with make_pool(1, initializer=remember_index) as pool:
        pid, index = pool.submit(index_seen_by_initializer).result(timeout=60)
    assert pid != os.getpid()
    assert index == 0


def test_worker_index_outside_a_worker_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match="worker_index"):
        worker_index()


# -- finalizer -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_the_finalizer_runs_in_each_worker_at_shutdown(make_pool: Any, tmp_path: Path) -> None:
    gate = tmp_path / "started"
    gate.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with make_pool(2, finalizer=write_farewell, finalargs=(str(out),)) as pool:
        futures = [pool.submit(index_when_all_started, str(gate), 2) for _ in range(2)]
        seen = dict((pid, index) for index, pid in (f.result(timeout=60) for f in futures))
        assert farewells(out) == {}  # (not before they leave)
    assert farewells(out) == seen


@pytest.mark.timeout(90)
def test_the_finalizer_runs_when_a_worker_is_recycled(make_pool: Any, tmp_path: Path) -> None:
    with make_pool(
        1, max_tasks_per_worker=1, finalizer=write_farewell, finalargs=(str(tmp_path),)
    ) as pool:
        first = pool.submit(index_and_pid).result(timeout=60)[1]
        # The first worker leaves after its task, before the pool is shut down.
        wait_for_path(str(tmp_path / f"{first}-0"))
        second = pool.submit(index_and_pid).result(timeout=60)[1]
    assert farewells(tmp_path) == {first: 0, second: 0}


@pytest.mark.timeout(90)
def test_the_finalizer_runs_when_an_idle_worker_leaves(make_pool: Any, tmp_path: Path) -> None:
    with make_pool(
        1, idle_timeout=0.2, finalizer=write_farewell, finalargs=(str(tmp_path),)
    ) as pool:
        pid = pool.submit(index_and_pid).result(timeout=60)[1]
        wait_for_path(str(tmp_path / f"{pid}-0"))  # (before shutdown: it left when idle)
        deadline = time.monotonic() + 60
        while pool.worker_pids():
            assert time.monotonic() < deadline, "the idle worker never left"
            time.sleep(0.01)


@pytest.mark.timeout(90)
def test_no_finalizer_in_a_worker_that_is_ended_or_dies(make_pool: Any, tmp_path: Path) -> None:
    options = {"finalizer": write_farewell, "finalargs": (str(tmp_path),), "task_timeout": 0.5}
    with make_pool(1, **options) as pool:
        with pytest.raises(TaskTimeoutError):
            pool.submit(sleep_then_pid, 30).result(timeout=60)
        with pytest.raises(WorkerLostError):
            pool.submit(die).result(timeout=60)
        last = pool.submit(index_and_pid).result(timeout=60)[1]
    # Only the worker that was still running at shutdown said goodbye.
    assert farewells(tmp_path) == {last: 0}


@pytest.mark.parametrize("engine", ["fork_server", "loky"])
def test_a_failing_finalizer_is_reported_on_stderr_and_shutdown_still_ends(engine: str) -> None:
    if engine == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    script = textwrap.dedent(
        f"""
        from pool_manager import BaseWorkerPool
        from pool_manager.loky import LokyWorkerPool

        def goodbye():
            raise ZeroDivisionError("farewell went wrong")

        if __name__ == "__main__":
            kind = LokyWorkerPool if {engine!r} == "loky" else BaseWorkerPool
            with kind(1, finalizer=goodbye) as pool:
                print(pool.submit(sum, [1, 2]).result(timeout=60))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    assert "finalizer failed" in done.stderr
    assert "ZeroDivisionError: farewell went wrong" in done.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"finalizer": 3}, "finalizer must be callable"),
        ({"finalizer": print, "finalargs": [1]}, "finalargs must be a tuple"),
        ({"initializer": "x"}, "initializer must be callable"),
    ],
)
def test_bad_hooks_are_type_errors(make_pool: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        make_pool(1, **options)


def test_the_loky_factory_passes_the_finalizer_on(tmp_path: Path) -> None:
    pytest.importorskip("loky", reason="the loky extra is not installed")
    from pool_manager.loky import LokyPoolFactory

    with pytest.raises(TypeError, match="finalizer must be callable"):
        LokyPoolFactory(finalizer=3)  # type: ignore[arg-type]
    pool: WorkerPool = LokyPoolFactory(finalizer=write_farewell, finalargs=(str(tmp_path),))(1)
    with pool:
        pid = pool.submit(index_and_pid).result(timeout=60)[1]
    assert farewells(tmp_path) == {pid: 0}
