"""No orphans: when the parent dies, even by SIGKILL, its workers exit soon after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from .helpers import poll

PARENT = textwrap.dedent(
    """
    import json, os, sys, time
    from pool_manager import WorkerPoolManager

    manager = WorkerPoolManager(2, 600, 3600, max_total_workers=None)
    pools = [manager.get_pool(key, 2)[0] for key in ("a", "b", "c")]
    for pool in pools:  # two workers each: two tasks that run at once
        assert list(pool.map(time.sleep, [0.3, 0.3], chunksize=1)) == [None, None]
    busy = pools[0].submit(time.sleep, 600)  # one worker is mid-task when the parent dies
    print(json.dumps([pid for pool in pools for pid in pool.worker_pids()]), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and getppid semantics: Linux")
def test_workers_and_the_fork_server_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr").open("w")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    stderr.close()
    try:
        assert parent.stdout is not None
        workers = json.loads(parent.stdout.readline())
        assert len(workers) == 6
        descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert set(workers) <= set(descendants)  # plus the fork server
    except BaseException:
        parent.kill()
        parent.wait()
        raise
    os.kill(parent.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    parent.wait()
    all_gone = poll(lambda: not any(_alive(pid) for pid in descendants), timeout=30)
    took = time.monotonic() - killed_at
    for pid in descendants:  # never leave them running, whatever happened
        if _alive(pid):
            psutil.Process(pid).kill()
    assert all_gone, f"still alive after {took:.1f}s: {[p for p in descendants if _alive(p)]}"
    # The promise is 2 s (a 0.25 s watchdog); the margin is for a loaded machine.
    assert took < 10, f"orphans took {took:.1f}s to exit"


def test_workers_ignore_sigint_so_a_ctrl_c_reaches_the_parent_alone(tmp_path: Path) -> None:
    from pool_manager import BaseWorkerPool

    from .helpers import touch_and_wait

    started, gate = tmp_path / "started", tmp_path / "gate"
    with BaseWorkerPool(1) as pool:
        future = pool.submit(touch_and_wait, str(started), str(gate))
        assert poll(started.exists, timeout=60)
        (worker,) = pool.worker_pids()
        os.kill(worker, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
        gate.touch()
        assert future.result(timeout=60) == worker  # the task finished undisturbed
        assert pool.worker_pids() == [worker]
