"""A manager the user forgot to shut down is cleaned up at interpreter exit."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

from pool_manager import BaseWorkerPool, PoolTerminatedError, WorkerPool, WorkerPoolManager

from .helpers import poll, square, touch_and_wait

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pool_manager import WorkerPoolManager

    manager = WorkerPoolManager(2, 600, 3600)
    pool, done = manager.get_pool("forgotten", 2)
    assert pool.submit(abs, -3).result() == 3
    other, _ = manager.get_pool("leased-forever", 1)
    other.submit(abs, -4).result()
    print(json.dumps(pool.worker_pids() + other.worker_pids()), flush=True)
    # no done(), no shutdown(): the interpreter exits with pools leased
    """
)


def test_forgotten_manager_is_cleaned_up_at_exit_without_hanging() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    pids = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(pids) == 2  # a worker each: one task each needed no more
    assert poll(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=30)
    assert "Traceback" not in completed.stderr, completed.stderr


def test_a_ctrl_c_handled_earlier_in_a_repl_does_not_make_exit_abandon_work(tmp_path: Path) -> None:
    # The REPL records every exception it prints in sys.last_value, a Ctrl-C
    # the user recovered from included; a later normal exit (EOF) must still
    # let accepted work finish.
    marker = tmp_path / "done"
    session = textwrap.dedent(
        f"""
        import time
        from pool_manager import BaseWorkerPool
        def job():
            time.sleep(0.5)
            open({str(marker)!r}, "w").write("done")

        pool = BaseWorkerPool(1)
        raise KeyboardInterrupt
        future = pool.submit(job)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-i"],
        input=session,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "KeyboardInterrupt" in completed.stderr
    assert marker.exists(), completed.stderr


def _ctrl_c_inside(open_block: Callable[[], Any], tmp_path: Path) -> list[Future[int]]:
    """Raise KeyboardInterrupt in a with-block while one task runs and nine wait."""
    started, gate = tmp_path / "started", tmp_path / "gate"  # the gate never opens
    futures: list[Future[int]] = []
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), open_block() as pool:
        futures.append(pool.submit(touch_and_wait, str(started), str(gate), 120))
        futures += [pool.submit(square, i) for i in range(9)]
        assert poll(started.exists, timeout=60)
        raise KeyboardInterrupt
    assert time.monotonic() - began < 30  # not the 120 s task
    return futures


def test_ctrl_c_leaving_a_pool_block_ends_running_work_and_cancels_the_backlog(
    tmp_path: Path,
) -> None:
    futures = _ctrl_c_inside(lambda: BaseWorkerPool(1, max_pending=None), tmp_path)
    with pytest.raises(PoolTerminatedError):
        futures[0].result(timeout=0)
    assert all(f.cancelled() for f in futures[1:])


def test_ctrl_c_leaving_a_manager_block_ends_running_work_and_cancels_the_backlog(
    tmp_path: Path,
) -> None:
    manager: list[WorkerPoolManager] = []

    @contextlib.contextmanager
    def block() -> Iterator[WorkerPool]:
        with WorkerPoolManager(1, 600, 3600, max_pending=None) as m:
            manager.append(m)
            with m.lease("a") as pool:
                yield pool

    futures = _ctrl_c_inside(block, tmp_path)
    with pytest.raises(PoolTerminatedError):
        futures[0].result(timeout=0)
    assert all(f.cancelled() for f in futures[1:])
    assert manager[0].stats()["shut_down"]
