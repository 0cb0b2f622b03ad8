"""Worker starts and the fork server: every failure reaches a future or a constructor.

A worker that cannot start is retried with a back-off, then its queued tasks
fail with `WorkerStartError`; a fork server that dies as it boots raises
`ForkServerError` with what it printed; the server takes any ``sys.path``,
any number of open descriptors, and any signal mask of the thread that
starts it. What changes process-wide state (rlimits, ``sys.path``, the
process's one fork server) runs in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

from pool_manager import (
    BaseWorkerPool,
    WorkerLostError,
    WorkerPoolManager,
    WorkerStartError,
    _process,
)
from pool_manager import _pool_start as start_module  # (where the retries read START_RETRY_*)

from .helpers import poll, square, wait_then_square

ROOT = Path(__file__).resolve().parent.parent  # (scripts in tmp_path import this checkout)

StartWorker = Callable[[_process.ForkServer], tuple[int, Any, int]]


def failing_start(
    monkeypatch: pytest.MonkeyPatch, failures: float, error_number: int = errno.EMFILE
) -> list[float]:
    """Make the fork server's worker starts fail ``failures`` times (inf: always).

    Returns the times of the attempts.
    """
    attempts: list[float] = []
    original: StartWorker = _process.ForkServer.start_worker

    def start_worker(server: _process.ForkServer) -> tuple[int, Any, int]:
        attempts.append(time.monotonic())
        if len(attempts) <= failures:
            raise OSError(error_number, os.strerror(error_number))
        return original(server)

    monkeypatch.setattr(_process.ForkServer, "start_worker", start_worker)
    return attempts


def retry_threads() -> list[threading.Thread]:
    """The worker starter's thread, which also makes the retries (it ends with none due)."""
    return [t for t in threading.enumerate() if t.name == "pool_manager-starter"]


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[dict[str, Any], str]:
    """Run ``script`` in a fresh interpreter; its last stdout line is JSON."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def run_script_file(
    tmp_path: Path, script: str, sitecustomize: str, timeout: float = 150
) -> tuple[dict[str, Any], str]:
    """`run_script`, from a file, with ``sitecustomize`` importable in every process
    (it tells the fork server, started with ``-c``, from the script)."""
    (tmp_path / "sitecustomize.py").write_text(sitecustomize)
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    completed = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


# -- a worker that cannot start ------------------------------------------------


@pytest.mark.timeout(60)
def test_a_worker_that_fails_to_start_is_retried_with_a_back_off_and_the_task_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts = failing_start(monkeypatch, failures=3)
    with BaseWorkerPool(1) as pool:
        future = pool.submit(square, 7)
        assert future.result(timeout=30) == 49
    assert len(attempts) == 4
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    # Each retry waits longer than the one before (0.05 s, 0.1 s, 0.2 s).
    expected = [start_module.START_RETRY_FIRST * 2**i for i in range(3)]
    assert all(gap >= 0.9 * wait for gap, wait in zip(gaps, expected)), gaps


@pytest.mark.timeout(60)
def test_a_worker_that_never_starts_fails_the_queued_tasks_naming_the_os_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(start_module, "START_RETRY_WINDOW", 0.5)
    attempts = failing_start(monkeypatch, failures=float("inf"))
    with BaseWorkerPool(2) as pool:
        started = time.monotonic()
        futures = [pool.submit(square, i) for i in range(3)]
        errors = [future.exception(timeout=30) for future in futures]
        waited = time.monotonic() - started
        for error in errors:
            assert isinstance(error, WorkerStartError)
            assert isinstance(error, BrokenProcessPool)  # ProcessPoolExecutor handlers catch it
            assert isinstance(error.__cause__, OSError)
            assert error.__cause__.errno == errno.EMFILE
            assert "Too many open files" in str(error)
        assert 0.5 <= waited < 30
        assert len(attempts) >= 3  # retried before giving up
        assert pool.task_counts()["failed"] == 3
        # The pool is not broken: once workers can start, the next submit runs.
        monkeypatch.undo()
        assert pool.submit(square, 5).result(timeout=30) == 25


@pytest.mark.timeout(60)
def test_a_pool_whose_worker_is_alive_keeps_its_tasks_while_more_workers_fail_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with BaseWorkerPool(2) as pool:
        first = pool.submit(wait_then_square, str(gate), 3)
        assert poll(lambda: pool.task_counts()["running"] == 1, timeout=30)
        monkeypatch.setattr(start_module, "START_RETRY_WINDOW", 0.3)
        attempts = failing_start(monkeypatch, failures=float("inf"))
        second = pool.submit(square, 4)  # no idle worker: it wants a second one
        assert poll(lambda: attempts, timeout=30)
        # Past the retry window the pool gives up starting one, but its live
        # worker can run the task: it waits for it instead of failing.
        assert poll(lambda: not retry_threads(), timeout=30)
        assert not second.done()
        gate.touch()
        assert first.result(timeout=30) == 9
        assert second.result(timeout=30) == 16


@pytest.mark.timeout(60)
def test_with_no_thread_to_start_workers_on_the_tasks_fail_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_thread = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "pool_manager-starter":
            raise RuntimeError("can't start new thread")
        start_thread(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with BaseWorkerPool(1) as pool:
        error = pool.submit(square, 2).exception(timeout=10)
        assert isinstance(error, WorkerStartError)
        assert isinstance(error.__cause__, RuntimeError)
        monkeypatch.undo()
        assert pool.submit(square, 3).result(timeout=30) == 9


@pytest.mark.timeout(60)
def test_a_worker_whose_io_thread_cannot_start_is_ended_and_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_thread = threading.Thread.start
    refused: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "pool_manager-io" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start_thread(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with BaseWorkerPool(1) as pool:
        assert pool.submit(square, 6).result(timeout=30) == 36
        assert len(pool.worker_pids()) == 1  # the first worker was ended, not left behind
    assert refused


@pytest.mark.timeout(60)
def test_a_fork_server_that_cannot_be_spawned_is_retried_and_not_left_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _process._server is None  # (no other holder in this process)
    spawns: list[int] = []
    original = _process.ForkServer.__init__

    def init(server: _process.ForkServer) -> None:
        spawns.append(1)
        if len(spawns) <= 2:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        original(server)

    monkeypatch.setattr(_process.ForkServer, "__init__", init)
    with BaseWorkerPool(1) as pool:
        assert pool.submit(square, 8).result(timeout=30) == 64
    assert len(spawns) == 3
    # The failed spawns took no hold on the server: the pool's release stopped it.
    assert _process._server is None
    assert _process._holders == 0


@pytest.mark.timeout(60)
def test_a_manager_whose_fork_server_cannot_be_spawned_raises_and_leaves_nothing_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _process._server is None  # (no other holder in this process)

    def init(server: _process.ForkServer) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(_process.ForkServer, "__init__", init)
    with pytest.raises(OSError, match="Too many open files"):
        WorkerPoolManager(2, 60, 600)
    # No supervisor thread was started (the leak check), and no hold taken.
    assert _process._holders == 0
    monkeypatch.undo()
    with WorkerPoolManager(2, 60, 600) as manager, manager.lease("a") as pool:
        assert pool.submit(square, 3).result(timeout=30) == 9


# -- the real thing, in fresh processes ------------------------------------------

OUT_OF_DESCRIPTORS = """
    import json, os, resource
    import psutil
    from pool_manager import BaseWorkerPool
    import pool_manager._pool_start as start_module

    def exhaust(leave):
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        for fd in hog[len(hog) - leave:]:
            os.close(fd)
        return hog[: len(hog) - leave]

    def release(hog):
        for fd in hog:
            os.close(fd)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    report = {}

    # Out of descriptors at the first submit (the fork server cannot even be
    # spawned), then they come back while the pool retries: the task runs.
    start_module.START_RETRY_WINDOW = 60.0
    first = BaseWorkerPool(1)
    hog = exhaust(0)
    future = first.submit(pow, 2, 10)
    report["done_while_out"] = future.done()
    release(hog)
    report["recovered"] = future.result(timeout=60)

    # Out of descriptors with a few left, at each step of a start (the
    # socket pair, the status pipe; the I/O loop already runs for the
    # first pool's worker): the tasks fail, naming the error, until there
    # are enough; then the same pools run tasks.
    start_module.START_RETRY_WINDOW = 0.3
    pools = [BaseWorkerPool(1) for _ in range(7)]
    failures = []
    for leave, pool in enumerate(pools):
        hog = exhaust(leave)
        try:
            error = pool.submit(pow, 2, leave).exception(timeout=60)
        finally:
            release(hog)
        failures.append([
            type(error).__name__, getattr(error.__cause__, "errno", None)
        ] if error is not None else None)
    report["failures"] = failures
    report["later"] = [pool.submit(pow, 2, 3).result(timeout=60) for pool in pools]
    for pool in [first, *pools]:
        pool.shutdown()
    report["children"] = len(psutil.Process().children(recursive=True))
    print(json.dumps(report))
"""


@pytest.mark.timeout(180)
def test_a_process_out_of_file_descriptors_retries_then_fails_with_emfile_and_recovers() -> None:
    report, _ = run_script(OUT_OF_DESCRIPTORS, timeout=150)
    assert report["done_while_out"] is False
    assert report["recovered"] == 1024
    # With 0 to 3 descriptors free, a start fails at one step or another (it
    # needs 4: the I/O loop, which runs already, needs none of a pool's own).
    assert report["failures"] == [["WorkerStartError", errno.EMFILE]] * 4 + [None] * 3
    assert report["later"] == [8] * 7
    assert report["children"] == 0


MANY_DESCRIPTORS = """
    import json, os, resource
    from pool_manager import WorkerLostError, WorkerPoolManager, _process

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    connections = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    with WorkerPoolManager(2, 60, 600) as manager:
        with manager.lease("a") as pool:
            result = pool.submit(pow, 2, 10).result(timeout=60)
            error = pool.submit(os._exit, 3).exception(timeout=60)
            after = pool.submit(pow, 2, 4).result(timeout=60)
            control = _process._server._control.fileno()
    print(json.dumps({
        "control": control,
        "result": result,
        "lost": [type(error).__name__, getattr(error, "exitcode", None)],
        "after": after,
    }))
"""


@pytest.mark.timeout(180)
def test_a_process_with_over_1024_descriptors_open_runs_tasks_and_sees_crashes() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is too low")
    report, _ = run_script(MANY_DESCRIPTORS, timeout=150)
    assert report["control"] >= 1024  # the server's socket has a number select() rejects
    assert report["result"] == 1024
    assert report["lost"] == [WorkerLostError.__name__, 3]
    assert report["after"] == 16


SIGCHLD_BLOCKED = """
    import json, os, signal, threading
    from pool_manager import BaseWorkerPool, _process

    def blocked_mask(pid):
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)

    def service(box):
        # A service thread that leaves every signal to the main thread, and
        # is the first to use a pool: it starts the fork server.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        pool = BaseWorkerPool(1)
        box.append(pool.submit(os.getpid).result(timeout=60))
        box.append(pool)

    box = []
    thread = threading.Thread(target=service, args=(box,))
    thread.start()
    thread.join()
    worker, pool = box
    report = {
        "server_mask": blocked_mask(_process._server.pid),
        "worker_mask": blocked_mask(worker),
    }
    error = pool.submit(os._exit, 1).exception(timeout=60)
    report["lost"] = [type(error).__name__, getattr(error, "exitcode", None)]
    report["next"] = pool.submit(pow, 2, 4).result(timeout=60)
    pool.shutdown()
    print(json.dumps(report))
"""


@pytest.mark.timeout(180)
def test_a_thread_with_sigchld_blocked_that_starts_the_fork_server_hides_no_worker_death() -> None:
    report, _ = run_script(SIGCHLD_BLOCKED, timeout=150)
    assert report["server_mask"] == 0
    assert report["worker_mask"] == 0
    assert report["lost"] == [WorkerLostError.__name__, 1]
    assert report["next"] == 16


BOOT_FAILS = """
    import json, sys, time
    import psutil
    from pool_manager import BaseWorkerPool, ForkServerError, WorkerPoolManager

    broken = sys.argv[1]  # holds a cloudpickle.py that raises: the server cannot boot
    sys.path.insert(0, broken)
    report = {}
    try:
        WorkerPoolManager(2, 60, 600)
    except ForkServerError as error:
        report["manager"] = [str(error), error.output, error.exitcode]
    report["children_after_manager"] = len(psutil.Process().children())

    pool = BaseWorkerPool(1)
    started = time.monotonic()
    error = pool.submit(pow, 2, 3).exception(timeout=60)
    report["seconds"] = time.monotonic() - started
    report["task"] = [type(error).__name__, str(error), type(error.__cause__).__name__]

    sys.path.remove(broken)  # fixed: the next submit starts a new server
    report["later"] = pool.submit(pow, 2, 3).result(timeout=60)
    with WorkerPoolManager(2, 60, 600) as manager, manager.lease("a") as leased:
        report["manager_later"] = leased.submit(pow, 3, 2).result(timeout=60)
    pool.shutdown()
    report["children"] = len(psutil.Process().children(recursive=True))
    print(json.dumps(report))
"""


@pytest.mark.timeout(180)
def test_a_fork_server_that_dies_at_boot_raises_what_it_printed(tmp_path: Path) -> None:
    (tmp_path / "cloudpickle.py").write_text('raise RuntimeError("no cloudpickle in here")\n')
    report, _ = run_script(BOOT_FAILS, str(tmp_path), timeout=150)
    message, output, exitcode = report["manager"]
    assert "exited as it started" in message
    assert "Traceback" in message and "no cloudpickle in here" in message
    assert "RuntimeError: no cloudpickle in here" in output
    assert exitcode == 1
    assert report["children_after_manager"] == 0  # the dead server was reaped
    kind, text, cause = report["task"]
    assert (kind, cause) == ("WorkerStartError", "ForkServerError")
    assert "no cloudpickle in here" in text
    assert report["seconds"] < start_module.START_RETRY_WINDOW  # not retried: it would die again
    assert report["later"] == 8
    assert report["manager_later"] == 9
    assert report["children"] == 0


BOOT_HANGS = """
    import json, time
    import psutil
    from pool_manager import ForkServerError, WorkerPoolManager, _process

    _process.SERVER_BOOT_TIMEOUT = 1.0
    started = time.monotonic()
    try:
        WorkerPoolManager(2, 60, 600)
    except ForkServerError as error:
        report = {"error": str(error), "output": error.output}
    report["seconds"] = time.monotonic() - started
    report["children"] = len(psutil.Process().children(recursive=True))
    print(json.dumps(report))
"""

SITECUSTOMIZE_HANGS_IN_SERVER = """
import sys, time
if sys.argv[:1] == ["-c"]:  # the fork server (the test's script is a file)
    print("the server is stuck", file=sys.stderr, flush=True)
    time.sleep(120)
"""


@pytest.mark.timeout(180)
def test_a_fork_server_that_hangs_at_boot_is_killed_and_raises(tmp_path: Path) -> None:
    report, _ = run_script_file(tmp_path, BOOT_HANGS, SITECUSTOMIZE_HANGS_IN_SERVER)
    assert "did not start within 1s" in report["error"]
    assert report["output"] == "the server is stuck"
    assert report["seconds"] < 60
    assert report["children"] == 0


PRINTS = """
    import json, sys
    from pool_manager import BaseWorkerPool, _process

    def shout():
        print("a worker says hello", file=sys.stderr, flush=True)
        return 1

    with BaseWorkerPool(1) as pool:
        result = pool.submit(shout).result(timeout=60)
        server = _process._server.pid
    print(json.dumps({"server": server, "result": result}))
"""

SITECUSTOMIZE_CHATTY_SERVER = """
import os, sys
if sys.argv[:1] == ["-c"]:  # the fork server (the test's script is a file)
    print(f"booting server {os.getpid()}", file=sys.stderr)
    print("x" * 200_000, file=sys.stderr)  # more than a pipe holds
"""


@pytest.mark.timeout(180)
def test_what_the_server_prints_at_boot_and_its_workers_print_reaches_our_stderr(
    tmp_path: Path,
) -> None:
    report, stderr = run_script_file(tmp_path, PRINTS, SITECUSTOMIZE_CHATTY_SERVER)
    assert report["result"] == 1
    assert f"booting server {report['server']}" in stderr
    assert "x" * 200_000 in stderr
    assert "a worker says hello" in stderr


ODD_PATHS = """
    import json, os, pathlib, sys
    from pool_manager import WorkerPoolManager

    home = pathlib.Path(sys.argv[1])
    odd = str(home / "a 'quoted' \\"dir\\"\\nwith ü")
    sys.path.append(home / "as_path")  # a pathlib.Path (repr: PosixPath(...))
    sys.path.append(odd)
    sys.path.append(os.fsencode(home / "as_bytes"))
    sys.path.append(42)  # not a path at all: left out

    def probe():
        import in_path_dir  # lives in the directory given as a Path
        return sys.path, in_path_dir.VALUE

    with WorkerPoolManager(2, 60, 600) as manager, manager.lease("a") as pool:
        worker_path, value = pool.submit(probe).result(timeout=60)
    print(json.dumps({
        "worker_path": worker_path,
        "value": value,
        "expected": [os.fsdecode(entry) for entry in sys.path if entry != 42],
    }))
"""


@pytest.mark.timeout(180)
def test_every_sys_path_entry_reaches_the_workers_as_a_string(tmp_path: Path) -> None:
    (tmp_path / "as_path").mkdir()
    (tmp_path / "as_path" / "in_path_dir.py").write_text("VALUE = 42\n")
    report, _ = run_script(ODD_PATHS, str(tmp_path), timeout=150)
    assert report["value"] == 42
    assert report["worker_path"] == report["expected"]
    assert str(tmp_path / "as_path") in report["worker_path"]
    assert str(tmp_path / "as_bytes") in report["worker_path"]
