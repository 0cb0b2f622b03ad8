"""``native_threads``: each worker's BLAS and OpenMP thread pools sized to its
share of the CPUs (``_native_threads.py``), on both engines.

A task reports its environment's variables and what threadpoolctl sees of
numpy's BLAS, which it imports then (after the variables are set); the
usable CPU count is patched to simulate a large machine. A script run in a
fresh interpreter covers numpy imported by the main module, which the fork
server (and a ``spawn``-started loky worker) loads before the variables are
set: only threadpoolctl limits it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# (threadpoolctl, if installed, is imported here: it sets KMP_DUPLICATE_LIB_OK
# in os.environ as it loads, which the leak check would take for a test's doing.)
with contextlib.suppress(ImportError):
    import threadpoolctl  # noqa: F401

from pool_manager import BaseWorkerPool, WorkerPool, WorkerPoolManager, _native_threads, _process
from pool_manager._native_threads import THREAD_VARIABLES, ThreadLimit

ROOT = Path(__file__).resolve().parent.parent  # (the script imports this checkout)


def threads_report() -> tuple[dict[str, str | None], list[int]]:
    """(In a worker) the variables, and the thread counts of numpy's BLAS libraries."""
    import numpy  # noqa: F401  (loaded now, after the worker's environment is set)
    import threadpoolctl

    blas = [info["num_threads"] for info in threadpoolctl.threadpool_info()]
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}, blas


@pytest.fixture(params=["fork_server", "loky"])
def engine(request: pytest.FixtureRequest) -> str:
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    return str(request.param)


@pytest.fixture(autouse=True)
def parent_sets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent starts with none of the variables set (a test sets what it needs)."""
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def cpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """The CPUs this process may use, as the pools read them."""
    monkeypatch.setattr(_process, "cpu_count", lambda: count)


def pool_on(engine: str, max_size: int, **options: Any) -> WorkerPool:
    if engine == "loky":
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool(max_size, **options)
    return BaseWorkerPool(max_size, **options)


def report_of(pool: WorkerPool) -> tuple[dict[str, str | None], list[int]]:
    with pool:
        return pool.submit(threads_report).result(timeout=120)


# -- in the workers, both engines ------------------------------------------------


@pytest.mark.timeout(180)
def test_auto_gives_each_worker_its_share_of_the_cpus(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpus(monkeypatch, 64)
    variables, blas = report_of(pool_on(engine, 16))
    assert variables == dict.fromkeys(THREAD_VARIABLES, "4")  # 64 CPUs // 16 workers
    # (A library reads its variable up to the CPUs there really are.)
    variables, blas = report_of(pool_on(engine, 64))
    assert variables == dict.fromkeys(THREAD_VARIABLES, "1")
    assert blas and set(blas) == {1}


@pytest.mark.timeout(180)
def test_an_int_sets_every_variable_but_those_the_pools_env_names(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # (an int overrides the parent's)
    pool = pool_on(engine, 2, native_threads=1, env={"MKL_NUM_THREADS": "5"})
    variables, blas = report_of(pool)
    assert variables == dict.fromkeys(THREAD_VARIABLES, "1") | {"MKL_NUM_THREADS": "5"}
    assert blas and set(blas) == {1}


@pytest.mark.timeout(180)
def test_none_leaves_the_variables_and_libraries_as_the_parent_had_them(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpus(monkeypatch, 64)  # ("auto" would give 1)
    monkeypatch.setenv("NUMEXPR_NUM_THREADS", "3")
    variables, blas = report_of(pool_on(engine, 64, native_threads=None))
    assert variables == dict.fromkeys(THREAD_VARIABLES) | {"NUMEXPR_NUM_THREADS": "3"}
    if len(os.sched_getaffinity(0)) > 1:
        assert blas and min(blas) > 1  # (numpy's default: a thread per CPU)


@pytest.mark.timeout(180)
def test_under_auto_a_variable_the_user_set_stands_and_omp_speaks_for_the_blas(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpus(monkeypatch, 64)  # "auto": 64 // 32 = 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "9")
    variables, blas = report_of(pool_on(engine, 32, env={"VECLIB_MAXIMUM_THREADS": "6"}))
    assert variables == {
        "OMP_NUM_THREADS": "1",
        # (Their libraries read OMP_NUM_THREADS when their own is not set.)
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "BLIS_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "VECLIB_MAXIMUM_THREADS": "6",  # the pool's env
        "NUMBA_NUM_THREADS": "9",  # the parent's
    }
    assert blas and set(blas) == {1}


@pytest.mark.timeout(180)
def test_a_managers_pools_get_its_native_threads(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: dict[str, Any] = {"engine": engine, "memory_sample_interval": None}
    with (
        WorkerPoolManager(2, 60, 600, native_threads=1, **options) as manager,
        manager.lease("a") as pool,
    ):
        variables, blas = pool.submit(threads_report).result(timeout=120)
    assert variables == dict.fromkeys(THREAD_VARIABLES, "1")
    assert blas and set(blas) == {1}
    cpus(monkeypatch, 64)  # "auto", worked out for pool_size (64 // 32)
    with WorkerPoolManager(32, 60, 600, **options) as manager, manager.lease("a") as pool:
        variables, _ = pool.submit(threads_report).result(timeout=120)
    assert variables == dict.fromkeys(THREAD_VARIABLES, "2")


@pytest.mark.timeout(120)
def test_a_loky_factorys_pools_get_its_native_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("loky", reason="the loky extra is not installed")
    from pool_manager.loky import LokyPoolFactory

    cpus(monkeypatch, 64)
    pool = LokyPoolFactory(native_threads=3)(4)
    assert report_of(pool)[0] == dict.fromkeys(THREAD_VARIABLES, "3")
    pool = LokyPoolFactory()(16)  # ("auto", for the size the manager asks for)
    assert report_of(pool)[0] == dict.fromkeys(THREAD_VARIABLES, "4")


# -- numpy loaded before the worker's environment: threadpoolctl -----------------

#: A script whose main module imports numpy: the fork server imports it (so
#: OpenBLAS starts there, a thread per CPU), and so does a ``spawn``-started
#: loky worker before its initializer. Its last line: what each worker saw.
SCRIPT = """
import json, os, sys
if "--no-threadpoolctl" in sys.argv:
    sys.modules["threadpoolctl"] = None  # (the fork server runs this too)
if "--no-numpy" not in sys.argv:
    import numpy
from pool_manager import BaseWorkerPool

def blas():
    from threadpoolctl import threadpool_info
    return os.environ.get("OPENBLAS_NUM_THREADS"), [i["num_threads"] for i in threadpool_info()]

def found_by_the_server():
    from pool_manager import _native_threads
    return _native_threads._prepared, _native_threads._controller is not None

def blas_plain():
    return os.environ.get("OPENBLAS_NUM_THREADS")

if __name__ == "__main__":
    report = {}
    if "--no-numpy" in sys.argv:
        with BaseWorkerPool(1, native_threads=1) as pool:
            report["found_by_the_server"] = pool.submit(found_by_the_server).result(timeout=60)
    elif "--no-threadpoolctl" in sys.argv:
        with BaseWorkerPool(1, native_threads=1) as pool:
            report["plain"] = pool.submit(blas_plain).result(timeout=60)
    else:
        with BaseWorkerPool(1, native_threads=None) as pool:
            report["server"] = pool.submit(blas).result(timeout=60)[1]
        with BaseWorkerPool(1, native_threads=1) as pool:
            report["fork_server"] = pool.submit(blas).result(timeout=60)
            report["found_by_the_server"] = pool.submit(found_by_the_server).result(timeout=60)
        if "--loky" in sys.argv:
            from pool_manager.loky import LokyWorkerPool
            with LokyWorkerPool(1, context="spawn", native_threads=1) as pool:
                report["loky_spawn"] = pool.submit(blas).result(timeout=60)
    print(json.dumps(report))
"""


def run_script(tmp_path: Path, *args: str) -> dict[str, Any]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT))
    environ = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    done = subprocess.run(
        [sys.executable, str(path), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        env=environ | {"PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "threadpoolctl could not" not in done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(180)
def test_numpy_loaded_by_the_main_module_before_the_worker_is_limited_too(
    tmp_path: Path,
) -> None:
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    loky = ["--loky"] if _has("loky") else []
    report = run_script(tmp_path, *loky)
    if len(os.sched_getaffinity(0)) > 1:  # (the server's OpenBLAS: a thread per CPU)
        assert min(report["server"]) > 1
    assert report["fork_server"] == ["1", [1]]
    # (threadpoolctl's scan, once in the fork server, not in each worker)
    assert report["found_by_the_server"] == [True, True]
    if loky:
        assert report["loky_spawn"] == ["1", [1]]


@pytest.mark.timeout(180)
def test_a_main_module_without_numpy_spares_each_worker_the_look(tmp_path: Path) -> None:
    # (The fork server looked once, after importing it: its workers do not.)
    assert run_script(tmp_path, "--no-numpy") == {"found_by_the_server": [True, False]}


@pytest.mark.timeout(180)
def test_without_threadpoolctl_the_variables_still_are_set(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    assert run_script(tmp_path, "--no-threadpoolctl") == {"plain": "1"}


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -- the rules, without workers ----------------------------------------------------


def test_auto_is_the_cpus_over_the_pools_size_and_at_least_one() -> None:
    assert ThreadLimit.of("auto", 4, 16) == ThreadLimit(4, explicit=False)
    assert ThreadLimit.of("auto", 3, 16) == ThreadLimit(5, explicit=False)
    assert ThreadLimit.of("auto", 32, 16) == ThreadLimit(1, explicit=False)
    assert ThreadLimit.of(2, 32, 16) == ThreadLimit(2, explicit=True)
    assert ThreadLimit.of(None, 4, 16) is None


@pytest.mark.parametrize(
    ("value", "error"),
    [("all", ValueError), ("", ValueError), (0, ValueError), (-1, ValueError),
     (1.5, TypeError), (True, TypeError), ([2], TypeError)],
)  # fmt: skip
def test_bad_native_threads_raise_naming_the_option(value: object, error: type) -> None:
    with pytest.raises(error, match="native_threads"):
        ThreadLimit.of(value, 2, 2)
    with pytest.raises(error, match="native_threads"):
        BaseWorkerPool(2, native_threads=value)  # type: ignore[arg-type]
    with pytest.raises(error, match="native_threads"):
        WorkerPoolManager(2, 60, 600, native_threads=value)  # type: ignore[arg-type]
    if _has("loky"):
        from pool_manager.loky import LokyPoolFactory, LokyWorkerPool

        with pytest.raises(error, match="native_threads"):
            LokyWorkerPool(2, native_threads=value)  # type: ignore[arg-type]
        with pytest.raises(error, match="native_threads"):
            LokyPoolFactory(native_threads=value)  # type: ignore[arg-type]


def test_the_fork_servers_worker_environment_gets_what_the_rule_says() -> None:
    environ = {b"OMP_NUM_THREADS": b"3", b"MKL_NUM_THREADS": b"8", b"OTHER": b"x"}
    pool_env = {b"MKL_NUM_THREADS": b"8"}
    auto = dict(environ)
    ThreadLimit(2, explicit=False).worker_environ(auto, pool_env)
    assert auto == environ | {
        b"OPENBLAS_NUM_THREADS": b"3",  # (OMP_NUM_THREADS's word)
        b"BLIS_NUM_THREADS": b"3",
        b"NUMEXPR_NUM_THREADS": b"3",
        b"VECLIB_MAXIMUM_THREADS": b"2",
        b"NUMBA_NUM_THREADS": b"2",
    }
    explicit = dict(environ)
    ThreadLimit(2, explicit=True).worker_environ(explicit, pool_env)
    assert explicit == {name.encode(): b"2" for name in THREAD_VARIABLES} | {
        b"MKL_NUM_THREADS": b"8",
        b"OTHER": b"x",
    }


def test_a_loky_workers_variables_follow_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_NUM_THREADS", "5")
    assert ThreadLimit(2, explicit=False).loky_env({"OMP_NUM_THREADS": "1"}) == {
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "BLIS_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "VECLIB_MAXIMUM_THREADS": "2",
    }
    explicit = ThreadLimit(2, explicit=True).loky_env({"OMP_NUM_THREADS": "1"})
    assert explicit == {name: "2" for name in THREAD_VARIABLES if name != "OMP_NUM_THREADS"}


class FakeController:
    """threadpoolctl's controller, as `limit_loaded` uses it: what it limited."""

    def __init__(self, libraries: list[dict[str, Any]], fail: bool = False) -> None:
        self.libraries = libraries
        self.fail = fail
        self.limits: dict[int, list[str]] = {}
        self._selected: list[str] = []

    def info(self) -> list[dict[str, Any]]:
        if self.fail:
            raise OSError("no such symbol")
        return self.libraries

    def select(self, *, filepath: list[str]) -> FakeController:
        self._selected = filepath
        return self

    def limit(self, *, limits: int) -> None:
        self.limits[limits] = sorted(self._selected)


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeController]:
    """A fake as the fork server's controller (`_native_threads.prepare`)."""
    fake = FakeController(
        [
            {"internal_api": "openmp", "num_threads": 8, "filepath": "/omp"},
            {"internal_api": "openblas", "num_threads": 8, "filepath": "/openblas"},
            {"internal_api": "flexiblas", "num_threads": 8, "filepath": "/flexiblas"},
            {"internal_api": "mkl", "num_threads": 3, "filepath": "/mkl"},
            {"internal_api": "blis", "num_threads": 8, "filepath": "/blis"},
        ]
    )
    monkeypatch.setattr(_native_threads, "_controller", fake)
    yield fake


def test_each_loaded_library_is_limited_to_what_its_variable_says(
    controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # (already so: left alone)
    monkeypatch.setenv("BLIS_NUM_THREADS", "4,2")  # (not a count: left alone)
    _native_threads.limit_loaded(3)
    assert controller.limits == {2: ["/omp"], 3: ["/flexiblas", "/openblas"]}


def test_a_threadpoolctl_failure_is_a_warning_not_the_workers(
    controller: FakeController,
) -> None:
    controller.fail = True
    with pytest.warns(RuntimeWarning, match="threadpoolctl could not limit"):
        _native_threads.limit_loaded(1)


@pytest.mark.timeout(60)
def test_nothing_loaded_is_known_without_importing_threadpoolctl() -> None:
    pytest.importorskip("numpy")
    code = (
        "import sys; from pool_manager._native_threads import _may_be_loaded as loaded; "
        "before = loaded(); import numpy; "
        "print(before, loaded(), 'threadpoolctl' in sys.modules)"
    )
    environ = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=environ
    )
    assert done.stdout.split() == ["False", "True", "False"], done.stderr
