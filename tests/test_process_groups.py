"""A task's own child processes end with its worker when the worker is ended.

Each worker leads a process group of its own; a timeout, ``kill_task`` or
``terminate`` ends the group, as loky's ``kill_workers`` does. A worker that
leaves cleanly leaves what its tasks started alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest

from pool_manager import BaseWorkerPool, TaskKilledError, TaskTimeoutError

from .helpers import poll, start_child_and_wait


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _child_pid(pidfile: Path) -> int:
    assert poll(pidfile.exists, timeout=30), "the task did not start its child"
    return int(pidfile.read_text())


@pytest.mark.parametrize("how", ["task_timeout", "kill_task", "terminate"])
def test_ending_a_worker_ends_the_processes_its_task_started(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "child.pid"
    child = None
    pool = BaseWorkerPool(1, task_timeout=1.0 if how == "task_timeout" else None)
    try:
        future: Future[None] = pool.submit(start_child_and_wait, str(pidfile))
        child = _child_pid(pidfile)
        assert not _gone(child)
        end: dict[str, Callable[[], object]] = {
            "task_timeout": lambda: None,
            "kill_task": lambda: pool.kill_task(future),
            "terminate": pool.terminate,
        }
        end[how]()
        error = future.exception(timeout=30)
        expected = {"task_timeout": TaskTimeoutError, "kill_task": TaskKilledError}
        if how in expected:
            assert isinstance(error, expected[how])
        assert poll(lambda: _gone(child), timeout=30), "the task's child outlived its worker"
    finally:
        pool.terminate()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_a_worker_leaves_its_own_process_group(tmp_path: Path) -> None:
    with BaseWorkerPool(1) as pool:
        pid = pool.submit(os.getpid).result(timeout=30)
        assert pool.submit(os.getpgid, 0).result(timeout=30) == pid
        assert os.getpgid(0) != pid
