"""The main script's module in the workers (``_main_module.py``).

Workers have the parent's main module imported as ``__mp_main__``, so a
function of the script that a task runs sees what an initializer set, keeps
state between tasks, and reads the module's data without a copy per task;
an exception class of the script raised in a worker is the parent's class.
Where there is no importable main module (``python -c``, standard input), or
its import fails, ``__main__``'s objects travel by value, as before, with one
warning. Each test runs a script in a fresh interpreter (it is the process's
``__main__``), under a hard timeout.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from pool_manager._main_module import by_reference, main_to_import
from pool_manager._protocol import MainReport, MainToImport, dump_call

ROOT = Path(__file__).resolve().parent.parent  # (scripts import this checkout)

#: What every script below defines: a global an initializer sets, a counter,
#: an exception class, and a report of them as JSON (its last stdout line).
COMMON = """
import json, os, sys, warnings
from pool_manager import BaseWorkerPool

TABLE = None
COUNT = 0

def setup(size):
    global TABLE
    TABLE = list(range(size))

def read_table(index):
    return TABLE[index]

def bump():
    global COUNT
    COUNT += 1
    return COUNT

class ScriptError(Exception):
    pass

def fail(message):
    raise ScriptError(message, ScriptError.__module__)

def counts(size=4):
    with BaseWorkerPool(1) as pool:
        return [pool.submit(bump).result(timeout=60) for _ in range(size)]
"""


def run(
    args: list[str],
    cwd: Path,
    stdin: str | None = None,
    timeout: float = 90,
) -> tuple[dict[str, Any], str]:
    """Run the interpreter with ``args`` in ``cwd``; its last stdout line is JSON."""
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def run_script(tmp_path: Path, body: str, *args: str) -> tuple[dict[str, Any], str]:
    path = tmp_path / "script.py"
    path.write_text(COMMON + textwrap.dedent(body))
    return run([str(path), *args], tmp_path)


def warnings_in(stderr: str) -> int:
    return stderr.count("RuntimeWarning")


@pytest.mark.timeout(150)
def test_an_initializer_sets_a_global_that_the_tasks_read(tmp_path: Path) -> None:
    report, stderr = run_script(
        tmp_path,
        """
        if __name__ == "__main__":
            with BaseWorkerPool(2, initializer=setup, initargs=(100,)) as pool:
                values = [pool.submit(read_table, i).result(timeout=60) for i in (0, 5, 99)]
            print(json.dumps({"values": values}))
        """,
    )
    assert report == {"values": [0, 5, 99]}
    assert warnings_in(stderr) == 0


@pytest.mark.timeout(150)
def test_a_script_function_keeps_its_globals_between_tasks_on_one_worker(
    tmp_path: Path,
) -> None:
    report, _ = run_script(
        tmp_path,
        """
        from pool_manager import WorkerPoolManager
        if __name__ == "__main__":
            with WorkerPoolManager(
                pool_size=1, stale_pool_expiration=600, max_pool_lifetime=3600
            ) as manager:
                with manager.lease("k") as pool:
                    managed = [pool.submit(bump).result(timeout=60) for _ in range(3)]
            print(json.dumps({"counts": counts(), "managed": managed}))
        """,
    )
    assert report == {"counts": [1, 2, 3, 4], "managed": [1, 2, 3]}


@pytest.mark.timeout(150)
def test_a_large_module_global_is_not_copied_into_each_task(tmp_path: Path) -> None:
    report, _ = run_script(
        tmp_path,
        """
        import psutil
        DATA = bytes(100 * 1024 * 1024)

        def size_of_data(index):
            return len(DATA) + index

        def peak_rss():
            # (VmHWM, reset below: ru_maxrss would count the peak of the process
            # that started this one, which execve keeps: a big test runner's.)
            with open("/proc/self/status") as status:
                line = next(line for line in status if line.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024

        if __name__ == "__main__":
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # (the peak starts again from here)
            before = psutil.Process().memory_info().rss
            with BaseWorkerPool(2) as pool:
                sizes = list(pool.map(size_of_data, range(20), chunksize=1))
                # (Why, if it grew: was the function not sent by reference?)
                by_reference = pool._main_by_reference(size_of_data)
            growth = peak_rss() - before
            print(json.dumps({"sizes": sizes[:2], "growth": growth, "by_reference": by_reference}))
        """,
    )
    assert report["sizes"] == [100 * 1024 * 1024, 100 * 1024 * 1024 + 1]
    assert report["by_reference"], report
    assert report["growth"] < 300 * 1024 * 1024, report


@pytest.mark.timeout(150)
def test_an_exception_class_of_the_script_raised_in_a_worker_is_caught_in_the_parent(
    tmp_path: Path,
) -> None:
    report, _ = run_script(
        tmp_path,
        """
        if __name__ == "__main__":
            with BaseWorkerPool(1) as pool:
                try:
                    pool.submit(fail, "no").result(timeout=60)
                except ScriptError as error:
                    caught = [type(error).__module__, *error.args]
            print(json.dumps({"caught": caught}))
        """,
    )
    # Raised as the workers' main module's class, caught as ours.
    assert report == {"caught": ["__main__", "no", "__mp_main__"]}


@pytest.mark.timeout(150)
def test_lambdas_closures_and_functions_reading_guarded_globals_still_travel_by_value(
    tmp_path: Path,
) -> None:
    report, stderr = run_script(
        tmp_path,
        """
        def read_guarded():
            return GUARDED

        class ReadsGuarded:
            def get(self):
                return GUARDED

        def redefined():
            return "at the top level"

        if __name__ == "__main__":
            GUARDED = "set under the guard"

            def redefined():
                return "under the guard"

            offset = 10
            with BaseWorkerPool(1) as pool:
                results = [
                    pool.submit(lambda: offset + 1).result(timeout=60),
                    pool.submit((lambda: lambda: offset + 2)()).result(timeout=60),
                    pool.submit(read_guarded).result(timeout=60),
                    pool.submit(ReadsGuarded().get).result(timeout=60),
                    pool.submit(redefined).result(timeout=60),
                ]
            print(json.dumps({"results": results}))
        """,
    )
    assert report == {
        "results": [11, 12, "set under the guard", "set under the guard", "under the guard"]
    }
    assert warnings_in(stderr) == 0


@pytest.mark.timeout(150)
def test_a_script_that_reads_its_arguments_at_top_level_sees_them_in_the_workers(
    tmp_path: Path,
) -> None:
    report, stderr = run_script(
        tmp_path,
        """
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("word")
        WORD = parser.parse_args().word

        def get_word():
            return [WORD, __name__]

        if __name__ == "__main__":
            with BaseWorkerPool(1) as pool:
                word = pool.submit(get_word).result(timeout=60)
            print(json.dumps({"word": word, "counts": counts()}))
        """,
        "hello",
    )
    assert report == {"word": ["hello", "__mp_main__"], "counts": [1, 2, 3, 4]}
    assert warnings_in(stderr) == 0


@pytest.mark.timeout(150)
def test_a_task_may_start_a_pool_of_its_own(tmp_path: Path) -> None:
    # (The fork server refuses pools only while it imports the module: its
    # workers may start pools, whose fork server imports the module again.)
    report, stderr = run_script(
        tmp_path,
        """
        def nested():
            return [__name__, counts(2)]

        if __name__ == "__main__":
            with BaseWorkerPool(1) as pool:
                inner = pool.submit(nested).result(timeout=60)
            print(json.dumps({"inner": inner}))
        """,
    )
    assert report == {"inner": ["__mp_main__", [1, 2]]}
    assert warnings_in(stderr) == 0


@pytest.mark.timeout(150)
def test_an_event_loop_does_not_wait_for_the_fork_server_to_import_the_main_module(
    tmp_path: Path,
) -> None:
    # (pool.run submits on the loop's thread when it would not wait: the
    # first task with a __main__ function is submitted on another thread.)
    report, _ = run_script(
        tmp_path,
        """
        import asyncio, time
        if __name__ != "__main__":
            time.sleep(1.5)  # (a slow top level, in the fork server only)

        async def main():
            gaps = []
            async def tick():
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)  # (ticking)
            with BaseWorkerPool(1) as pool:
                values = [await pool.run(bump) for _ in range(3)]
            ticker.cancel()
            return values, max(gaps)

        if __name__ == "__main__":
            values, longest = asyncio.run(main())
            print(json.dumps({"values": values, "longest": longest}))
        """,
    )
    assert report["values"] == [1, 2, 3]
    assert report["longest"] < 0.75, report


#: Script top levels that fail in the fork server's import (only there).
FAILING_TOP_LEVELS = {
    "raises": 'if __name__ != "__main__":\n    raise ValueError("not here")\n',
    "exits": 'if __name__ != "__main__":\n    sys.exit(3)\n',
    "ends_the_server": 'if __name__ != "__main__":\n    os._exit(4)\n',
    "hangs": 'if __name__ != "__main__":\n    import time\n    time.sleep(120)\n',
    "starts_a_pool_unguarded": (
        "with BaseWorkerPool(1) as TOP_POOL:\n"
        "    TOP = TOP_POOL.submit(abs, -7).result(timeout=60)\n"
    ),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("top_level", sorted(FAILING_TOP_LEVELS))
def test_a_main_module_that_fails_to_import_leaves_pools_working_by_value_with_one_warning(
    tmp_path: Path, top_level: str
) -> None:
    report, stderr = run_script(
        tmp_path,
        FAILING_TOP_LEVELS[top_level]
        + textwrap.dedent(
            """
            if __name__ == "__main__":
                from pool_manager import _process
                _process.MAIN_IMPORT_TIMEOUT = 3.0  # (for "hangs")
                first = counts()
                with BaseWorkerPool(2, initializer=setup, initargs=(3,)) as pool:
                    second = [pool.submit(bump).result(timeout=60) for _ in range(2)]
                print(json.dumps({"counts": first, "second": second}))
            """
        ),
    )
    # By value: each task has its own copy of the counter.
    assert report == {"counts": [1, 1, 1, 1], "second": [1, 1]}
    assert warnings_in(stderr) == 1, stderr
    assert "if __name__ == '__main__':" in stderr
    if top_level == "starts_a_pool_unguarded":
        assert "a pool was started while the main module was being imported" in stderr


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_a_main_module_that_cannot_be_imported_sends_its_functions_by_value(
    tmp_path: Path, how: str
) -> None:
    code = COMMON + 'print(json.dumps({"counts": counts()}))\n'
    if how == "-c":
        report, stderr = run(["-c", code], tmp_path)
    else:
        report, stderr = run(["-"], tmp_path, stdin=code)
    assert report == {"counts": [1, 1, 1, 1]}
    assert warnings_in(stderr) == 0


@pytest.mark.timeout(150)
def test_a_module_run_with_dash_m_is_the_workers_main_module(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("START = 10\n")
    (package / "module.py").write_text(
        COMMON
        + textwrap.dedent(
            """
            from .helper import START

            def from_start():
                return START + bump()

            if __name__ == "__main__":
                with BaseWorkerPool(1) as pool:
                    values = [pool.submit(from_start).result(timeout=60) for _ in range(3)]
                print(json.dumps({"values": values, "counts": counts()}))
            """
        )
    )
    report, stderr = run(["-m", "package.module"], tmp_path)
    assert report == {"values": [11, 12, 13], "counts": [1, 2, 3, 4]}
    assert warnings_in(stderr) == 0


# -- the parent's decisions, in this process ---------------------------------------


def fake_main(monkeypatch: pytest.MonkeyPatch, **attributes: Any) -> types.ModuleType:
    """Make ``sys.modules['__main__']`` a module with these attributes (for the test)."""
    module = types.ModuleType("__main__")
    module.__spec__ = None
    for name, value in attributes.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "__main__", module)
    return module


def test_the_main_module_to_import_is_a_script_or_a_module_run_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "script.py"
    script.write_text("")
    fake_main(monkeypatch, __file__=str(script))
    assert main_to_import() == MainToImport(None, str(script), sys.argv)
    fake_main(monkeypatch, __spec__=types.SimpleNamespace(name="package.module"))
    assert main_to_import() == MainToImport("package.module", None, sys.argv)
    # A package's __main__ (python -m pkg, python -m pytest), python -c, stdin,
    # a file that is not Python source, a file gone: nothing to import.
    fake_main(monkeypatch, __spec__=types.SimpleNamespace(name="pytest.__main__"))
    assert main_to_import() is None
    fake_main(monkeypatch, __spec__=types.SimpleNamespace(name="__main__"))
    assert main_to_import() is None
    fake_main(monkeypatch)
    assert main_to_import() is None
    fake_main(monkeypatch, __file__=str(tmp_path / "pytest"))
    assert main_to_import() is None
    fake_main(monkeypatch, __file__=str(tmp_path / "gone.py"))
    assert main_to_import() is None


def test_a_main_function_goes_by_reference_only_if_the_workers_have_the_same_one_and_its_globals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__", "SHARED": 1, "OURS_ONLY": 2}
    exec("def reads_shared():\n    return SHARED + len([])\n", namespace)
    exec("def reads_ours_only():\n    return OURS_ONLY\n", namespace)
    main = fake_main(monkeypatch, **namespace)
    shared, ours_only = main.reads_shared, main.reads_ours_only
    report = MainReport(
        True,
        {"reads_shared": 1, "reads_ours_only": 1},
        {},
        frozenset({"SHARED", "reads_shared", "reads_ours_only"}),
    )
    assert by_reference(shared, report)
    # It reads a global that their module lacks and ours has: by value.
    assert not by_reference(ours_only, report)
    # Defined at another line there: another function.
    assert not by_reference(shared, report._replace(functions={"reads_shared": 7}))
    # Not there at all, or their import failed.
    assert not by_reference(shared, report._replace(functions={}))
    assert not by_reference(shared, report._replace(imported=False))
    # Our name now means another function.
    main.reads_shared = ours_only
    assert not by_reference(shared, report)


def test_dump_call_writes_a_main_function_by_reference_only_where_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def task(*args):\n    return args\n", namespace)
    main = fake_main(monkeypatch, **namespace)
    task = main.task

    def yes(obj: object) -> bool:
        return obj is task

    for args in [(1,), ([1],)]:  # (the fast path, and cloudpickle's)
        by_reference = dump_call(task, args, {}, yes)
        by_value = dump_call(task, args, {}, None)
        assert pickle.loads(by_reference)[0] is task
        assert b"__main__" in by_reference and b"cloudpickle" not in by_reference
        assert b"cloudpickle" in by_value
        assert pickle.loads(by_value)[0] is not task
