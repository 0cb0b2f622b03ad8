"""What a worker's process looks like: the parent's working directory,
environment and interpreter flags as they are when it starts, and setup
failures reported with their cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pool_manager import BaseWorkerPool, WorkerPoolBrokenError

from .helpers import LoadsNowhere, poll

ROOT = Path(__file__).resolve().parents[1]


def cwd_and_variables(*names: str) -> tuple[str, list[str | None]]:
    return os.getcwd(), [os.environ.get(name) for name in names]


# -- the working directory and the environment ---------------------------------


@pytest.mark.timeout(120)
def test_a_worker_started_after_a_chdir_and_environ_change_sees_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (monkeypatch restores the directory and the environment after the test.)
    monkeypatch.setenv("PM_TEST_REMOVED", "before")
    monkeypatch.setenv("PM_TEST_CHANGED", "before")
    names = ("PM_TEST_REMOVED", "PM_TEST_CHANGED", "PM_TEST_ADDED")
    # One task per worker: each task runs in a worker started for it.
    with BaseWorkerPool(1, max_tasks_per_worker=1) as pool:
        before = pool.submit(cwd_and_variables, *names).result(timeout=60)
        assert before == (os.getcwd(), ["before", "before", None])
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("PM_TEST_REMOVED")
        monkeypatch.setenv("PM_TEST_CHANGED", "after")
        monkeypatch.setenv("PM_TEST_ADDED", "new")
        expected = (str(tmp_path), [None, "after", "new"])
        assert pool.submit(cwd_and_variables, *names).result(timeout=60) == expected
        # A pool built after the change sees it too (same fork server).
        with BaseWorkerPool(1) as later:
            assert later.submit(cwd_and_variables, *names).result(timeout=60) == expected


@pytest.mark.timeout(120)
def test_the_pools_env_is_set_over_the_parents_current_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PM_TEST_SHARED", "parent")
    monkeypatch.setenv("PM_TEST_PARENT_ONLY", "parent")
    with BaseWorkerPool(1, env={"PM_TEST_SHARED": "pool", "PM_TEST_POOL_ONLY": "pool"}) as pool:
        _, values = pool.submit(
            cwd_and_variables, "PM_TEST_SHARED", "PM_TEST_PARENT_ONLY", "PM_TEST_POOL_ONLY"
        ).result(timeout=60)
    assert values == ["pool", "parent", "pool"]
    assert os.environ.get("PM_TEST_POOL_ONLY") is None  # (the parent's is untouched)


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"OMP_NUM_THREADS": 1}, TypeError),
        ({1: "x"}, TypeError),
        ({"PATH": None}, TypeError),
        ({"A": b"bytes"}, TypeError),
        (["A=1"], TypeError),
        ({"A=B": "x"}, ValueError),
        ({"": "x"}, ValueError),
        ({"A": "x\0y"}, ValueError),
    ],
)
def test_an_env_that_is_not_str_to_str_is_rejected_when_the_pool_is_built(
    env: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="env"):
        BaseWorkerPool(1, env=env)  # type: ignore[arg-type]


# -- setup failures name their cause --------------------------------------------


@pytest.mark.timeout(120)
def test_initargs_that_fail_to_unpickle_in_the_worker_fail_tasks_with_the_workers_traceback(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    lost: list[str] = []
    with BaseWorkerPool(1, initializer=print, initargs=(LoadsNowhere("no such plugin"),)) as pool:
        pool.add_worker_event_callback(
            lambda kind, pid, why: lost.append(why) if kind == "worker_lost" else None
        )
        future = pool.submit(pow, 2, 3)
        with pytest.raises(WorkerPoolBrokenError) as caught:
            future.result(timeout=60)
    message = str(caught.value)
    assert "could not set themselves up" in message
    assert "killed as they start" not in message
    assert "Traceback (most recent call last)" in message
    assert "RuntimeError: no such plugin" in message
    # Logged once by the pool (the workers print nothing).
    assert poll(lambda: "the setup before it failed" in caplog.text, timeout=30)
    assert caplog.text.count("RuntimeError: no such plugin") == 1
    assert "no such plugin" not in capfd.readouterr().err
    assert poll(lambda: len(lost) >= 3, timeout=30)
    assert set(lost) == {"setup failed"}


@pytest.mark.timeout(120)
def test_a_raising_initializer_is_still_reported_as_the_initializer(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with (
        BaseWorkerPool(1, initializer=int, initargs=("not a number",)) as pool,
        pytest.raises(WorkerPoolBrokenError) as caught,
    ):
        pool.submit(pow, 2, 3).result(timeout=60)
    assert "the pool's initializer failed" in str(caught.value)
    assert "ValueError: invalid literal for int()" in str(caught.value)
    capfd.readouterr()


# -- interpreter flags ----------------------------------------------------------


def run_with_flags(*flags: str) -> dict[str, object]:
    """Run a pool in ``python FLAGS``; returns what its worker saw."""
    script = textwrap.dedent(
        """
        import json, sys, warnings
        from pool_manager import BaseWorkerPool

        def probe():
            asserts = True
            try:
                assert False
            except AssertionError:
                pass
            else:
                asserts = False
            try:
                warnings.warn("old", DeprecationWarning)
                warned = "ignored"
            except DeprecationWarning:
                warned = "raised"
            return {
                "optimize": sys.flags.optimize,
                "asserts": asserts,
                "warnoptions": list(sys.warnoptions),
                "utf8_mode": sys.flags.utf8_mode,
                "warning": warned,
            }

        with BaseWorkerPool(1) as pool:
            print(json.dumps(pool.submit(probe).result(timeout=60)))
        """
    )
    completed = subprocess.run(
        [sys.executable, *flags, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(150)
def test_workers_run_with_the_parents_optimize_flag() -> None:
    seen = run_with_flags("-O")
    assert seen["optimize"] == 1
    assert seen["asserts"] is False


@pytest.mark.timeout(150)
def test_workers_run_with_the_parents_warning_filters_and_x_options() -> None:
    seen = run_with_flags("-W", "error::DeprecationWarning", "-X", "utf8")
    assert seen["warnoptions"] == ["error::DeprecationWarning"]
    assert seen["warning"] == "raised"
    assert seen["utf8_mode"] == 1
    assert seen["optimize"] == 0
