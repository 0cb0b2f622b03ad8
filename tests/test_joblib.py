"""The joblib backend (``pool_manager.joblib``): ``Parallel`` calls, and
scikit-learn's ``n_jobs``, on a key's pool of a real manager.

Every test builds its managers with `make_manager`, which shuts them down
at its end (the leak check counts their workers); the test of the default
manager shuts that one down itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest

joblib = pytest.importorskip("joblib", reason="the joblib extra is not installed")

from joblib import Parallel, delayed, parallel_config  # noqa: E402

import pool_manager.joblib as pm_joblib  # noqa: E402
from pool_manager import WorkerLostError, WorkerPoolManager  # noqa: E402
from pool_manager.joblib import PoolManagerBackend  # noqa: E402

# (scikit-learn, if installed, is imported here: it sets KMP_* variables in
# os.environ as it loads, which the leak check would take for the test's doing.)
with contextlib.suppress(ImportError):
    import sklearn.model_selection  # noqa: F401

from .helpers import (  # noqa: E402
    FakeClock,
    exit_process,
    getpid,
    most_at_once,
    raise_value_error,
    square,
    wait_for_path,
)

STALE = 60.0
LIFETIME = 600.0
KEY = "tenant-a"

pytestmark = pytest.mark.timeout(60)


def _loky_installed() -> bool:
    try:
        import loky  # noqa: F401
    except ImportError:
        return False
    return True


ENGINES = [
    "fork_server",
    pytest.param(
        "loky",
        marks=pytest.mark.skipif(not _loky_installed(), reason="the loky extra is not installed"),
    ),
]


# -- tasks (in this importable module: the workers load them by reference) -----


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def record_run(directory: str, seconds: float) -> int:
    """Run ``seconds``, then leave a file named ``ran-<start>-<end>`` (``time.monotonic_ns``)."""
    start = time.monotonic_ns()
    time.sleep(seconds)  # (the work: tasks that would overlap if nothing capped them)
    Path(directory, f"ran-{start}-{time.monotonic_ns()}").touch()
    return os.getpid()


def nested_call(n: int) -> tuple[int, list[int], str]:
    """A ``Parallel`` call inside a task: its pid, the inner calls' pids, the inner backend."""
    inner = Parallel(n_jobs=4)(delayed(getpid)() for _ in range(n))
    backend, _ = joblib.parallel.get_active_backend()
    return os.getpid(), inner, type(backend).__name__


def first_or_wait(x: int, gate: str) -> int:
    """The first item returns at once; the others wait for ``gate``."""
    if x > 0:
        wait_for_path(gate)
    return x


def raise_or_wait(x: int, gate: str) -> int:
    """The first item fails at once; the others wait for ``gate``."""
    if x == 0:
        raise_value_error("item 0 failed")
    wait_for_path(gate)
    return x


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def make_manager() -> Iterator[Callable[..., WorkerPoolManager]]:
    managers: list[WorkerPoolManager] = []

    def make(pool_size: int = 2, **options: Any) -> WorkerPoolManager:
        manager = WorkerPoolManager(pool_size, STALE, LIFETIME, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.shutdown(wait=True)


def pool_pids(manager: WorkerPoolManager, key: Hashable) -> set[int]:
    with manager.lease(key, send_size=0) as pool:
        return set(pool.worker_pids())


def leases(manager: WorkerPoolManager, key: Hashable) -> int:
    return manager.stats()["pools"][key]["leases"]


# -- results, workers, caps --------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_results_come_in_order_from_the_keys_pool_workers(
    make_manager: Callable[..., WorkerPoolManager], engine: str
) -> None:
    manager = make_manager(engine=engine)
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        results = Parallel()(delayed(square_and_pid)(i) for i in range(40))
    assert [value for value, _ in results] == [square(i) for i in range(40)]
    ran_in = {pid for _, pid in results}
    assert os.getpid() not in ran_in
    assert ran_in <= pool_pids(manager, KEY)
    assert manager.keys() == [KEY]
    assert leases(manager, KEY) == 0


def test_n_jobs_above_pool_size_runs_at_most_pool_size_at_once(
    make_manager: Callable[..., WorkerPoolManager], tmp_path: Path
) -> None:
    manager = make_manager(pool_size=2)
    with parallel_config(backend="pool_manager", n_jobs=8, manager=manager, key=KEY):
        parallel = Parallel(batch_size=1)
        assert parallel._effective_n_jobs() == 2
        pids = parallel(delayed(record_run)(str(tmp_path), 0.1) for _ in range(8))
    assert len(os.listdir(tmp_path)) == 8
    assert most_at_once(str(tmp_path)) == 2  # (two ran together: the cap, not a lone worker)
    assert set(pids) <= pool_pids(manager, KEY)


def test_n_jobs_follows_joblibs_conventions_capped_at_pool_size(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    backend = PoolManagerBackend(make_manager(pool_size=3), KEY)
    assert [backend.effective_n_jobs(n) for n in (None, 1, 2, 3, 4, 100)] == [1, 1, 2, 3, 3, 3]
    assert [backend.effective_n_jobs(n) for n in (-1, -2, -3, -4, -100)] == [3, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)


def test_n_jobs_of_one_runs_in_the_caller_and_leases_nothing(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    manager = make_manager()
    with parallel_config(backend="pool_manager", n_jobs=1, manager=manager, key=KEY):
        results = Parallel()(delayed(square_and_pid)(i) for i in range(5))
    assert results == [(i * i, os.getpid()) for i in range(5)]
    assert KEY not in manager


def test_two_keys_run_on_two_pools(make_manager: Callable[..., WorkerPoolManager]) -> None:
    manager = make_manager()
    ran_in: dict[str, set[int]] = {}
    for key in ("a", "b"):
        with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=key):
            ran_in[key] = {
                pid for _, pid in Parallel()(delayed(square_and_pid)(i) for i in range(8))
            }
    assert set(manager.keys()) == {"a", "b"}
    assert ran_in["a"] <= pool_pids(manager, "a")
    assert ran_in["b"] <= pool_pids(manager, "b")
    assert not pool_pids(manager, "a") & pool_pids(manager, "b")


# -- the lease ---------------------------------------------------------------------


def test_a_call_holds_its_lease_until_it_ends(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    clock = FakeClock()
    manager = make_manager(clock=clock)
    seen: list[tuple[bool, int]] = []

    def calls() -> Iterator[Any]:
        # joblib reads the first items on this thread once the call has
        # begun: the pool, with no task yet, is kept by the call's lease alone.
        clock.advance(STALE * 3)
        manager.sweep()
        seen.append((KEY in manager, leases(manager, KEY)))
        for i in range(6):
            yield delayed(square)(i)

    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        assert Parallel()(calls()) == [square(i) for i in range(6)]
    assert seen == [(True, 1)]
    assert leases(manager, KEY) == 0
    # Released: the pool expires a full stale_pool_expiration after the call.
    clock.advance(STALE - 1)
    assert manager.sweep().expired == []
    clock.advance(1)
    assert manager.sweep().expired == [KEY]


def test_a_parallel_block_holds_its_lease_across_calls(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    clock = FakeClock()
    manager = make_manager(clock=clock)
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        with Parallel() as parallel:
            first = set(parallel(delayed(getpid)() for _ in range(4)))
            clock.advance(STALE * 3)
            assert manager.sweep().expired == []
            assert leases(manager, KEY) == 1
            second = set(parallel(delayed(getpid)() for _ in range(4)))
        assert leases(manager, KEY) == 0
    assert first | second <= pool_pids(manager, KEY)  # the same pool served both
    clock.advance(STALE)
    assert manager.sweep().expired == [KEY]


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:.*tasks which were still being processed")
def test_a_generator_closed_early_releases_its_lease(
    make_manager: Callable[..., WorkerPoolManager], tmp_path: Path
) -> None:
    manager = make_manager()
    gate = tmp_path / "gate"
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        results = Parallel(return_as="generator", batch_size=1)(
            delayed(first_or_wait)(i, str(gate)) for i in range(10)
        )
        assert next(results) == 0
        assert leases(manager, KEY) == 1  # (the call goes on: its tasks wait for the gate)
        results.close()
        assert leases(manager, KEY) == 0
    gate.touch()


# -- failures ----------------------------------------------------------------------


def test_a_tasks_exception_reaches_the_caller_with_its_type(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    manager = make_manager()
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        with pytest.raises(ValueError, match="the task's own message"):
            Parallel()(
                delayed(raise_value_error if i == 3 else square)(
                    "the task's own message" if i == 3 else i
                )
                for i in range(10)
            )
        assert leases(manager, KEY) == 0  # (released on the error's way out)
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_a_failure_in_a_parallel_block_leaves_the_block_ready(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    manager = make_manager()
    with (
        parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY),
        Parallel() as parallel,
    ):
        with pytest.raises(ValueError, match="in a block"):
            parallel(delayed(raise_value_error)("in a block") for _ in range(3))
        assert leases(manager, KEY) == 1  # (renewed by abort_everything)
        assert parallel(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    assert leases(manager, KEY) == 0


@pytest.mark.timeout(30)
def test_a_failure_cancels_the_calls_queued_tasks(
    make_manager: Callable[..., WorkerPoolManager], tmp_path: Path
) -> None:
    manager = make_manager()
    gate = tmp_path / "gate"
    with (
        parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY),
        pytest.raises(ValueError, match="item 0 failed"),
    ):
        # (pre_dispatch="all": every task is sent at once, past the pool's
        # max_pending, which joblib's sends never wait for)
        Parallel(pre_dispatch="all", batch_size=1)(
            delayed(raise_or_wait)(i, str(gate)) for i in range(20)
        )
    gate.touch()  # the item still running (at most one per worker) may finish now
    tasks = manager.stats()["pools"][KEY]["tasks"]
    assert tasks["submitted"] == 20
    assert tasks["cancelled"] >= 20 - 1 - 2 * manager.pool_size  # (a worker may hold one queued)
    assert leases(manager, KEY) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_worker_crash_raises_worker_lost_error_and_the_manager_goes_on(
    make_manager: Callable[..., WorkerPoolManager], engine: str
) -> None:
    manager = make_manager(engine=engine)
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        with pytest.raises(WorkerLostError):
            Parallel(batch_size=1)(
                delayed(exit_process if i == 5 else square)(1 if i == 5 else i) for i in range(12)
            )
        assert leases(manager, KEY) == 0
        assert Parallel()(delayed(square)(i) for i in range(6)) == [square(i) for i in range(6)]


@pytest.mark.timeout(30)
def test_joblibs_timeout_is_supported(
    make_manager: Callable[..., WorkerPoolManager], tmp_path: Path
) -> None:
    manager = make_manager()
    gate = tmp_path / "gate"
    with (
        parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")  # (joblib warns of a backend without timeouts)
        with pytest.raises((TimeoutError, multiprocessing.TimeoutError)):
            Parallel(timeout=0.2)(delayed(wait_for_path)(str(gate)) for _ in range(2))
    gate.touch()
    assert leases(manager, KEY) == 0


# -- nesting, defaults, registration -----------------------------------------------


def test_a_nested_call_runs_sequentially_in_the_worker(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    manager = make_manager()
    with parallel_config(backend="pool_manager", n_jobs=2, manager=manager, key=KEY):
        results = Parallel()(delayed(nested_call)(3) for _ in range(2))
    for pid, inner, backend in results:
        assert pid != os.getpid()
        assert inner == [pid] * 3
        assert backend == "SequentialBackend"
    assert manager.keys() == [KEY]


def test_a_backend_given_no_manager_uses_the_default_one_and_key() -> None:
    try:
        with parallel_config(backend="pool_manager", n_jobs=2):
            results = Parallel()(delayed(square_and_pid)(i) for i in range(6))
        default = pm_joblib.default_manager()
        assert default is pm_joblib.default_manager()
        assert default.keys() == [pm_joblib.DEFAULT_KEY]
        assert {pid for _, pid in results} <= pool_pids(default, pm_joblib.DEFAULT_KEY)
        assert default.pool_size >= 1 and not default.handles_signals
    finally:
        pm_joblib.shutdown_default_manager()
    assert pm_joblib._default is None


def test_register_is_idempotent_and_takes_a_name(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    backends = joblib.parallel.BACKENDS
    assert backends["pool_manager"] is PoolManagerBackend  # (on import)
    try:
        pm_joblib.register("tenant_pools")
        pm_joblib.register("tenant_pools")
        assert backends["tenant_pools"] is PoolManagerBackend
        manager = make_manager()
        with parallel_config(backend="tenant_pools", n_jobs=2, manager=manager, key="x"):
            assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]
        assert manager.keys() == ["x"]
    finally:
        backends.pop("tenant_pools", None)


def test_bad_backend_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="manager must be a WorkerPoolManager"):
        parallel_config(backend="pool_manager", manager="not a manager")
    with pytest.raises(TypeError, match="key must be hashable"):
        PoolManagerBackend(key=["a list"])
    with pytest.raises(TypeError):
        parallel_config(backend="pool_manager", managr=None)


# -- scikit-learn --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_scikit_learn_n_jobs_gives_the_sequential_scores(
    make_manager: Callable[..., WorkerPoolManager],
) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x, y = make_classification(n_samples=300, n_features=10, random_state=0)
    sequential = cross_val_score(LogisticRegression(max_iter=200), x, y, cv=3, n_jobs=1)
    manager = make_manager()
    with parallel_config(backend="pool_manager", manager=manager, key=KEY):
        pooled = cross_val_score(LogisticRegression(max_iter=200), x, y, cv=3, n_jobs=2)
    assert pooled.tolist() == sequential.tolist()
    assert manager.keys() == [KEY]  # (it ran on the pool, not in this process)
    assert manager.stats()["pools"][KEY]["tasks"]["completed"] >= 2
