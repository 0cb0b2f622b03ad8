"""CPython's own ``concurrent.futures`` test suite, run against `BaseWorkerPool`.

`BaseWorkerPool` claims to be a drop-in ``ProcessPoolExecutor``; this module
holds it to the yardstick CPython uses for ``ProcessPoolExecutor`` itself, in
the version of the interpreter running it.

The CPython tests are not vendored (licence and size). At collection this
module finds the running interpreter's ``test_concurrent_futures``: a single
file up to 3.11, a package (``util``, ``executor``, ``test_deadlock``...) from
3.12. It looks at ``$CPYTHON_CF_TESTS`` (a file or a package directory), then
the interpreter's own ``test`` package, then Debian's
``libpython3.X-testsuite`` (``/usr/lib/python3.X/test``). It loads what it
finds under a private module name and builds one ``unittest.TestCase`` per
process-pool test mixin with ``executor_type = BaseWorkerPool`` and the
"spawn" context (what the tests share with workers, a ``Manager``, comes from
it; the workers themselves always start from the fork server).
If there are none the whole module is skipped, saying how to get them.

Worker processes must find the CPython task functions (``mul``, ``init``,
``ErrorAtPickle``...) by reference: each is re-exported here with its
``__module__`` pointing at this module, so a worker that unpickles one imports
this module, which loads the same CPython tests again in the worker. (Where
two of the package's modules define one name, the second is exported as
``<name>__<module>``.)

Deselected tests are listed, each with its reason, in ``SKIPPED`` and
``EXPECTED_FAILURES`` below. Three tests that start a fresh interpreter with a
script importing ``concurrent.futures.<executor_type>`` are re-stated here with
the script importing `BaseWorkerPool` instead; their assertions are CPython's,
except that one also accepts ``PoolShutDownError`` (a ``RuntimeError``
subclass) as the class name in a traceback's text.
"""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing
import os
import sys
import sysconfig
import textwrap
import types
import unittest

import pytest

from pool_manager import BaseWorkerPool

_SUITE_NAME = "test_concurrent_futures"
_MODULE_NAME = "_cpython_test_concurrent_futures"
_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
_APT_HINT = f"apt-get install -y libpython{_VERSION}-testsuite"


def _find_cpython_suite() -> str | None:
    """The running interpreter's test_concurrent_futures: a package directory or a file."""
    candidates = []
    if os.environ.get("CPYTHON_CF_TESTS"):
        candidates.append(os.environ["CPYTHON_CF_TESTS"])
    for test_dir in (
        os.path.join(sysconfig.get_paths()["stdlib"], "test"),
        f"/usr/lib/python{_VERSION}/test",
    ):
        candidates.append(os.path.join(test_dir, _SUITE_NAME))  # 3.12 on
        candidates.append(os.path.join(test_dir, f"{_SUITE_NAME}.py"))  # up to 3.11
    for path in candidates:
        if os.path.isfile(os.path.join(path, "__init__.py")) or (
            path.endswith(".py") and os.path.isfile(path)
        ):
            return path
    return None


def _ensure_test_support(test_dir: str) -> str | None:
    """Make ``test.support`` importable; return why not, or None.

    Prefer the running interpreter's own ``test`` package; if it was stripped
    (as in the official Docker images), use the one next to the CPython tests.
    """
    needed = (
        "test.support",
        "test.support.import_helper",
        "test.support.threading_helper",
        "test.support.hashlib_helper",
        "test.support.script_helper",
    )
    try:
        for name in needed:
            importlib.import_module(name)
        return None
    except ImportError:
        pass
    if not os.path.isfile(os.path.join(test_dir, "support", "__init__.py")):
        return f"test.support is not importable and {test_dir} has no support package"
    for name in [n for n in sys.modules if n == "test" or n.startswith("test.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "test", os.path.join(test_dir, "__init__.py"), submodule_search_locations=[test_dir]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["test"] = package
    spec.loader.exec_module(package)
    try:
        for name in needed:
            importlib.import_module(name)
    except ImportError as error:
        return f"test.support from {test_dir} does not import: {error}"
    return None


def _exec_module(name: str, path: str, package_dir: str | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=None if package_dir is None else [package_dir]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_cpython_suite(path: str) -> list[types.ModuleType]:
    """Load the suite at ``path`` under `_MODULE_NAME`; returns its modules.

    A package's modules import each other relatively (``from .util import``),
    so they load as submodules of the private package name.
    """
    if path.endswith(".py"):
        module = sys.modules.get(_MODULE_NAME) or _exec_module(_MODULE_NAME, path)
        return [module]
    package = sys.modules.get(_MODULE_NAME) or _exec_module(
        _MODULE_NAME, os.path.join(path, "__init__.py"), package_dir=path
    )
    names = sorted(
        name.removesuffix(".py")
        for name in os.listdir(path)
        if name.endswith(".py") and name != "__init__.py"
    )
    return [package] + [importlib.import_module(f"{_MODULE_NAME}.{name}") for name in names]


def _cpython_suite() -> types.SimpleNamespace:
    """The suite's modules' names in one namespace (the first module to define a name wins)."""
    path = _find_cpython_suite()
    if path is None:
        pytest.skip(
            f"CPython {_VERSION}'s {_SUITE_NAME} tests not found (install them with "
            f"`{_APT_HINT}`, or point $CPYTHON_CF_TESTS at a copy of the file or package)",
            allow_module_level=True,
        )
    test_dir = os.path.dirname(path.rstrip(os.sep))
    problem = _ensure_test_support(test_dir)
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)
    try:
        modules = _load_cpython_suite(path)
    except unittest.SkipTest as error:  # e.g. no _multiprocessing
        pytest.skip(f"{path} skipped itself: {error}", allow_module_level=True)
    namespace: dict[str, object] = {}
    for module in modules:
        for name, value in vars(module).items():
            namespace.setdefault(name, value)
    _export_task_objects(modules)
    return types.SimpleNamespace(**namespace)


def _export_task_objects(modules: list[types.ModuleType]) -> None:
    """Re-export the suite's task functions and helper classes under this module.

    Not its TestCases, which pytest would collect and which test the stdlib
    executors. Workers then unpickle them by reference.
    """
    exported = globals()
    for module in modules:
        for name, value in list(vars(module).items()):
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported there, not defined there
            if not isinstance(value, (types.FunctionType, type)):
                continue
            if isinstance(value, type) and (
                issubclass(value, unittest.TestCase) or name.endswith(("Mixin", "Test", "Tests"))
            ):
                continue
            if value.__qualname__ != name:
                continue  # an alias
            export_as = name
            if name in exported:
                export_as = f"{name}__{module.__name__.rpartition('.')[2]}"
                if export_as in exported:
                    continue
                value.__qualname__ = export_as
            value.__module__ = __name__
            exported[export_as] = value


cf = _cpython_suite()


class _BaseWorkerPoolMixin(cf.ExecutorMixin):
    """CPython's ProcessPool*Mixin, for BaseWorkerPool."""

    executor_type = BaseWorkerPool
    ctx = "spawn"

    def get_context(self):  # type: ignore[no-untyped-def]
        # BaseWorkerPool accepts it as mp_context (its workers always come
        # from the fork server); its Manager is what the tests share with them.
        return multiprocessing.get_context(self.ctx)

    def setUp(self):  # type: ignore[no-untyped-def]
        self._stderr = sys.stderr
        super().setUp()

    def tearDown(self):  # type: ignore[no-untyped-def]
        try:
            super().tearDown()
        finally:
            # A result made of ErrorAtUnpickle replaces sys.stderr in the process
            # that unpickles it, this one; CPython's captured_stderr() restores it
            # only when that happens inside its block, and the result may come first.
            sys.stderr = self._stderr


# Adapted tests. CPython's versions run `python -c` scripts that do
# `from concurrent.futures import {executor_type.__name__}` and
# `from test.test_concurrent_futures import sleep_and_print`, neither of which
# exists for BaseWorkerPool; these are the same scripts and assertions with
# those two imports replaced.

_SLEEP_AND_PRINT = """
import sys, time
def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()
"""


def _script(body: str) -> str:
    return _SLEEP_AND_PRINT + textwrap.dedent(body)


class _AdaptedShutdownScripts:
    def test_interpreter_shutdown(self):  # type: ignore[no-untyped-def]
        rc, out, err = cf.assert_python_ok(
            "-c",
            _script(
                f"""
            from {self.executor_type.__module__} import {self.executor_type.__name__} as Pool
            if __name__ == "__main__":
                t = Pool(5, mp_context={self.ctx!r})
                t.submit(sleep_and_print, 1.0, "apple")
            """
            ),
        )
        self.assertFalse(err)
        self.assertEqual(out.strip(), b"apple")

    def test_submit_after_interpreter_shutdown(self):  # type: ignore[no-untyped-def]
        rc, out, err = cf.assert_python_ok(
            "-c",
            _script(
                f"""
            import atexit
            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise
            from {self.executor_type.__module__} import {self.executor_type.__name__} as Pool
            if __name__ == "__main__":
                t = Pool(5, mp_context={self.ctx!r})
                t.submit(id, 42).result()
            """
            ),
        )
        # CPython looks for "RuntimeError: cannot schedule new futures" in the
        # traceback; the pool raises PoolShutDownError, a RuntimeError subclass
        # (the "runtime-error" line shows `except RuntimeError` caught it), and
        # a traceback names the subclass.
        self.assertRegex(
            err.decode(), r"(RuntimeError|PoolShutDownError): cannot schedule new futures"
        )
        self.assertEqual(out.strip(), b"runtime-error")

    def test_hang_gh83386(self):  # type: ignore[no-untyped-def]
        # CPython skips this for ProcessPoolExecutor ("Hangs"); the pool is
        # expected not to.
        rc, out, err = cf.assert_python_ok(
            "-c",
            _script(
                f"""
            from {self.executor_type.__module__} import {self.executor_type.__name__} as Pool
            if __name__ == "__main__":
                t = Pool(max_workers=3, mp_context={self.ctx!r})
                t.submit(sleep_and_print, 1.0, "apple")
                t.shutdown(wait=False)
            """
            ),
        )
        self.assertFalse(err)
        self.assertEqual(out.strip(), b"apple")


# -- Deselected tests -------------------------------------------------------
# Keys are "<CPython mixin>.<test name>". Every entry says why. (An entry for
# a test that the running version's suite does not have is ignored.)
#
# Not deselected: ExecutorDeadlockTest's poison pickles (test_error_at_task_unpickle,
# test_exit_at_task_unpickle, test_error_during_result_unpickle_in_result_handler,
# test_exit_during_result_unpickle_in_result_handler). Each submits one poisoned
# task to a fresh executor and asserts that its future raises BrokenProcessPool.
# BaseWorkerPool fails only that task, with ArgumentUnpicklingError or
# ResultUnpicklingError, which are BrokenProcessPool subclasses, so the assertion
# holds; none of them asserts that the pool's other tasks fail.

SKIPPED: dict[str, str] = {
    # Pokes ProcessPoolExecutor internals that BaseWorkerPool does not have.
    "ProcessPoolShutdownTest.test_processes_terminate": (
        "passes a multiprocessing.Semaphore as a task's argument, which only a process "
        "that multiprocessing itself starts may inherit"
    ),
    "ProcessPoolExecutorTest.test_killed_child": (
        "expects every later submit to fail after a worker is killed, while BaseWorkerPool "
        "by design fails only the killed worker's task and starts a new worker"
    ),
    "ProcessPoolExecutorTest.test_saturation": (
        "passes a multiprocessing.Semaphore as a task's argument, which only a process "
        "that multiprocessing itself starts may inherit"
    ),
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle": (
        "joins executor._executor_manager_thread"
    ),
    "FailingInitializerMixin.test_initializer": (
        "polls executor._broken, expects the failure logged on the stdlib "
        "'concurrent.futures' logger, and expects every later submit to fail, while "
        "BaseWorkerPool by design starts new workers on the next submit after a break"
    ),
    # Not about executor_type at all: they build futures.ProcessPoolExecutor
    # themselves and then read its _processes/_call_queue/_executor_manager_thread.
    "ProcessPoolShutdownTest.test_context_manager_shutdown": (
        "constructs futures.ProcessPoolExecutor itself and reads its _processes"
    ),
    "ProcessPoolShutdownTest.test_del_shutdown": (
        "constructs futures.ProcessPoolExecutor itself and reads its internals"
    ),
    "ProcessPoolShutdownTest.test_shutdown_no_wait": (
        "constructs futures.ProcessPoolExecutor itself and reads its internals"
    ),
    "ProcessPoolExecutorTest.test_python_finalization_error": (
        "makes every thread start after the first fail, to break "
        "ProcessPoolExecutor's second thread (its queue feeder) and expect BrokenProcessPool; "
        "BaseWorkerPool starts one thread per pool, its I/O thread, which the mock lets "
        "start, so nothing fails, and the test's map then calls mul((2, 3)) with one "
        "argument (TypeError)"
    ),
    # A ProcessPoolExecutor feature BaseWorkerPool does not offer.
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": (
        "reads executor._mp_context (workers always start from the fork server)"
    ),
}

# Genuine behaviour gaps against ProcessPoolExecutor (strict: an XPASS fails,
# so a fix must remove the entry).
EXPECTED_FAILURES: dict[str, str] = {}


def _skipped(reason: str):  # type: ignore[no-untyped-def]
    @unittest.skip(reason)
    def test(self):  # type: ignore[no-untyped-def]
        pass

    return test


def _xfail(test, reason: str):  # type: ignore[no-untyped-def]
    @functools.wraps(test)
    def wrapper(self):  # type: ignore[no-untyped-def]
        return test(self)

    return pytest.mark.xfail(reason=reason, strict=True)(wrapper)


def _make_case(
    mixin: type,
    extra: tuple[type, ...] = (),
    engine: type = _BaseWorkerPoolMixin,
    skipped: dict[str, str] = SKIPPED,
    expected_failures: dict[str, str] = EXPECTED_FAILURES,
) -> type:
    """``mixin`` + the engine's pool + CPython's BaseTestCase, with deselections."""
    namespace: dict[str, object] = {"__module__": __name__}
    for key, reason in skipped.items():
        owner, test_name = key.split(".")
        if owner == mixin.__name__ and hasattr(mixin, test_name):
            namespace[test_name] = _skipped(f"CPython {key}: {reason}")
    for key, reason in expected_failures.items():
        owner, test_name = key.split(".")
        if owner == mixin.__name__ and hasattr(mixin, test_name):
            original = getattr(extra[0], test_name, None) if extra else None
            namespace[test_name] = _xfail(original or getattr(mixin, test_name), reason)
    base = mixin.__name__.removesuffix("Mixin").removesuffix("Tests").removesuffix("Test")
    name = f"Test{engine.executor_type.__name__}{base}"  # type: ignore[attr-defined]
    return type(name, (*extra, mixin, engine, cf.BaseTestCase), namespace)


# The ProcessPool-applicable mixins of CPython's suite, as CPython combines
# them with its ProcessPool{Fork,Forkserver,Spawn}Mixin.
TestBaseWorkerPoolInitializer = _make_case(cf.InitializerMixin)
TestBaseWorkerPoolFailingInitializer = _make_case(cf.FailingInitializerMixin)
TestBaseWorkerPoolProcessPoolShutdown = _make_case(
    cf.ProcessPoolShutdownTest, extra=(_AdaptedShutdownScripts,)
)
TestBaseWorkerPoolWait = _make_case(cf.WaitTests)
TestBaseWorkerPoolAsCompleted = _make_case(cf.AsCompletedTests)
TestBaseWorkerPoolProcessPoolExecutor = _make_case(cf.ProcessPoolExecutorTest)
TestBaseWorkerPoolExecutorDeadlock = _make_case(cf.ExecutorDeadlockTest)


# -- The loky engine ---------------------------------------------------------
# The same suite against `pool_manager.loky.LokyWorkerPool` (each worker a
# one-worker loky executor), with the deselections below: the BaseWorkerPool
# ones that hold for it too, and its own.

try:
    from pool_manager.loky import LokyWorkerPool
except ImportError:  # (the loky extra is not installed: no loky cases)
    LokyWorkerPool = None  # type: ignore[assignment,misc]

LOKY_SKIPPED: dict[str, str] = {
    **SKIPPED,
    "ProcessPoolExecutorTest.test_killed_child": (
        "expects every later submit to fail after a worker is killed, while LokyWorkerPool "
        "by design fails only the killed worker's task and starts a new slot"
    ),
    "FailingInitializerMixin.test_initializer": (
        "polls executor._broken, expects the failure logged on the stdlib "
        "'concurrent.futures' logger, and expects every later submit to fail, while "
        "LokyWorkerPool by design starts new slots on the next submit after a break"
    ),
}

LOKY_EXPECTED_FAILURES: dict[str, str] = {
    "ProcessPoolShutdownTest.test_interpreter_shutdown": (
        "submits to a new pool and exits at once: the pool's first loky worker would start "
        "as the interpreter exits, which loky cannot do (it registers an exit hook as each "
        "executor starts, which the interpreter then refuses), so the task fails with "
        "WorkerStartError instead of running (a pool whose workers have started finishes "
        "its tasks at exit: tests/test_loky.py)"
    ),
    "ProcessPoolShutdownTest.test_hang_gh83386": (
        "the same: a new pool's first worker would start as the interpreter exits"
    ),
}

if LokyWorkerPool is not None:

    class _LokyWorkerPoolMixin(_BaseWorkerPoolMixin):
        """CPython's ProcessPool*Mixin, for LokyWorkerPool."""

        executor_type = LokyWorkerPool

    def _make_loky_case(mixin: type, extra: tuple[type, ...] = ()) -> type:
        return _make_case(mixin, extra, _LokyWorkerPoolMixin, LOKY_SKIPPED, LOKY_EXPECTED_FAILURES)

    TestLokyWorkerPoolInitializer = _make_loky_case(cf.InitializerMixin)
    TestLokyWorkerPoolFailingInitializer = _make_loky_case(cf.FailingInitializerMixin)
    TestLokyWorkerPoolProcessPoolShutdown = _make_loky_case(
        cf.ProcessPoolShutdownTest, extra=(_AdaptedShutdownScripts,)
    )
    # concurrent.futures.wait and as_completed over the loky engine's futures
    # (about 40 s on 2 cores): in `make test-all`, which sets
    # POOL_MANAGER_CPYTHON_SUITE=full; `make test` keeps within CI's time with
    # the fork server's run of them and the loky engine's own tests of both.
    if os.environ.get("POOL_MANAGER_CPYTHON_SUITE") == "full":
        TestLokyWorkerPoolWait = _make_loky_case(cf.WaitTests)
        TestLokyWorkerPoolAsCompleted = _make_loky_case(cf.AsCompletedTests)
    TestLokyWorkerPoolProcessPoolExecutor = _make_loky_case(cf.ProcessPoolExecutorTest)
    TestLokyWorkerPoolExecutorDeadlock = _make_loky_case(cf.ExecutorDeadlockTest)
