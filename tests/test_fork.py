"""The application's own forks: what a forked child inherits is inert.

Each case runs in a fresh interpreter (a fork of the test process would
carry pytest along), under a timeout, and prints what it found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _run(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a session of its own; on a timeout, end all of it (forks included)."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"timed out (a fork hung?):\n{out}{err}")
    assert process.returncode == 0, out + err
    return out


@pytest.mark.parametrize("route", ["os.fork", "multiprocessing"])
def test_a_forked_child_exits_at_once_and_the_parent_shuts_down_at_once(route: str) -> None:
    out = _run(
        f"""
        import multiprocessing, os, time
        from pool_manager import WorkerPoolManager

        def child():
            time.sleep(0.1)  # exits normally: the exit hooks run

        with WorkerPoolManager(2, 60, 3600) as manager:
            with manager.lease("a") as pool:
                assert pool.submit(pow, 2, 3).result(timeout=30) == 8
            started = time.monotonic()
            if {route!r} == "os.fork":
                pid = os.fork()
                if pid == 0:
                    import sys
                    child()
                    sys.exit(0)  # (through the interpreter's exit, hooks and all)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                process = multiprocessing.get_context("fork").Process(target=child)
                process.start()
                process.join(30)
                code = process.exitcode
            print("child", code, round(time.monotonic() - started, 1))
            # A child still alive holds no copy of the fork server's socket:
            # shutting down does not wait for it.
            helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
            helper.start()
            started = time.monotonic()
        print("shutdown", round(time.monotonic() - started, 1))
        helper.kill()
        helper.join()
        """
    )
    child, shutdown = out.split("\n")[:2]
    _, code, seconds = child.split()
    assert code == "0" and float(seconds) < 10
    assert float(shutdown.split()[1]) < 5


def test_an_inherited_manager_or_pool_raises_in_the_child_and_leaves_the_parent_alone() -> None:
    out = _run(
        """
        import os, sys, time
        from pool_manager import BaseWorkerPool, UsedAfterForkError, WorkerPoolManager

        def ident(x):
            time.sleep(0.02)
            return x

        manager = WorkerPoolManager(1, 60, 3600)
        with manager.lease("tenant") as warm:
            warm.submit(ident, "warm").result(timeout=30)
        pool = BaseWorkerPool(1)
        pool.submit(ident, 0).result(timeout=30)
        pid = os.fork()
        if pid == 0:
            errors = []
            for use in (
                lambda: manager.get_pool("tenant"),
                lambda: warm.submit(ident, "child"),
                lambda: pool.submit(ident, "child"),
                lambda: manager.stats(),
            ):
                try:
                    use()
                except UsedAfterForkError as error:
                    errors.append("after the fork" in str(error))
            manager.shutdown()  # inert: the parent's workers are untouched
            pool.shutdown()
            print("child", errors, flush=True)
            sys.exit(0)
        with manager.lease("tenant") as again:
            got = [again.submit(ident, f"parent {i}").result(timeout=30) for i in range(5)]
        got += [pool.submit(ident, i).result(timeout=30) for i in range(3)]
        os.waitpid(pid, 0)
        print("parent", got == [f"parent {i}" for i in range(5)] + [0, 1, 2])
        pool.shutdown()
        manager.shutdown()
        """
    )
    assert "child [True, True, True, True]" in out
    assert "parent True" in out


def test_a_child_built_manager_works_after_the_fork() -> None:
    # The pattern for pre-forking servers: build the manager in the child.
    out = _run(
        """
        import os, sys
        from pool_manager import WorkerPoolManager

        parent = WorkerPoolManager(2, 60, 3600)
        with parent.lease("a") as pool:
            pool.submit(abs, -1).result(timeout=30)
        pid = os.fork()
        if pid == 0:
            with WorkerPoolManager(2, 60, 3600) as own:
                with own.lease("a", send_size=2) as pool:
                    futures = [pool.submit(abs, -i) for i in range(4)]
                print("child", [f.result(timeout=30) for f in futures], flush=True)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        with parent.lease("a") as pool:
            print("parent", pool.submit(abs, -7).result(timeout=30))
        parent.shutdown()
        """
    )
    assert "child [0, 1, 2, 3]" in out and "parent 7" in out


def test_no_worker_outlives_a_killed_parent_while_its_forked_child_lives(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import multiprocessing, os, signal, time
        from pool_manager import BaseWorkerPool, _process

        pool = BaseWorkerPool(2)
        list(pool.map(abs, range(4), chunksize=1))
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        with open({str(pids)!r}, "w") as out:
            print(_process._server.pid, *pool.worker_pids(), child.pid, file=out)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # (Not waiting for its output: the forked child would hold the pipe open.)
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parent.wait(timeout=60)
    *ours, child = (int(pid) for pid in pids.read_text().split())
    try:
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in ours) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [pid for pid in ours if _alive(pid)]
        assert not alive, f"the fork server or workers outlived their parent: {alive}"
    finally:
        for pid in (*ours, child):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_tasks_own_child_process_does_not_inherit_the_worker_socket() -> None:
    out = _run(
        """
        import os, subprocess, sys
        from pool_manager import BaseWorkerPool

        def open_in_a_child():
            # What a command the task runs would have open, beyond stdio.
            listing = subprocess.run(
                [sys.executable, "-c", "import os; print(sorted(os.listdir('/proc/self/fd')))"],
                capture_output=True, text=True, check=True,
            ).stdout
            return [int(fd) for fd in eval(listing) if int(fd) > 2]

        with BaseWorkerPool(1) as pool:
            print(pool.submit(open_in_a_child).result(timeout=30))
        """
    )
    # Only the listing's own descriptor (its /proc/self/fd handle) may remain.
    assert len(eval(out)) <= 1, out
