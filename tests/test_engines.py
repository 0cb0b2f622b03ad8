"""The engine a manager builds its pools on: the fork server where it can run,
loky elsewhere (``_platform.py``), or the one named with ``engine=``.

Other platforms cannot be run here: a platform without the fork server's
features is simulated in a child interpreter that deletes them (from ``os``,
``socket`` and ``signal``) before it imports the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

loky = pytest.importorskip("loky", reason="the loky extra is not installed")

from pool_manager import (  # noqa: E402
    DEFAULT_ENGINE,
    BaseWorkerPool,
    EngineUnavailableError,
    TaskTimeoutError,
    WorkerPoolManager,
)
from pool_manager.loky import LokyWorkerPool  # noqa: E402

from .helpers import run_step, square  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def run_without(missing: dict[str, list[str]], body: str, tmp_path: Path) -> dict[str, Any]:
    """Run ``body`` as a script whose interpreter lacks the ``missing`` attributes
    (module name -> names) from before the package is imported; returns the
    JSON its last line prints."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib
            for module, names in {missing!r}.items():
                module = importlib.import_module(module)
                for name in names:
                    if hasattr(module, name):
                        delattr(module, name)
            """
        )
        + textwrap.dedent(body)
    )
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_where_the_fork_server_cannot_run_managers_build_loky_pools(tmp_path: Path) -> None:
    # As on macOS: fork, but no memfd (and here no descriptor passing either).
    report = run_without(
        {"os": ["memfd_create", "MFD_CLOEXEC"], "socket": ["send_fds", "recv_fds"]},
        """
        import json, psutil
        import pool_manager
        from pool_manager import BaseWorkerPool, EngineUnavailableError, WorkerPoolManager

        def square(x):
            return x * x

        if __name__ == "__main__":
            report = {"default": pool_manager.DEFAULT_ENGINE}
            try:
                BaseWorkerPool(1)
            except EngineUnavailableError as error:
                report["refused"] = str(error)
            try:
                WorkerPoolManager(1, 60, 600, engine="fork_server")
            except EngineUnavailableError:
                report["named_refused"] = True
            with WorkerPoolManager(2, 60, 600, task_timeout=30) as manager:
                report["engine"] = manager.engine
                with manager.lease("a") as pool:
                    report["pool"] = type(pool).__name__
                    report["results"] = list(pool.map(square, range(5)))
                    report["timeout"] = pool.task_timeout
                    workers = pool.worker_pids()
                children = psutil.Process().children(recursive=True)
                report["fork_server"] = any(
                    "pool_manager._process" in " ".join(child.cmdline()) for child in children
                )
            report["left"] = [p for p in workers if psutil.pid_exists(p)
                              and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            print(json.dumps(report))
        """,
        tmp_path,
    )
    assert report["default"] == "loky" and report["engine"] == "loky"
    assert "socket.send_fds, os.memfd_create" in report["refused"]
    assert "LokyWorkerPool" in report["refused"] and report["named_refused"]
    assert report["pool"] == "LokyWorkerPool" and report["results"] == [0, 1, 4, 9, 16]
    assert report["timeout"] == 30 and not report["fork_server"] and report["left"] == []


def test_importing_the_package_never_fails_without_posix_features(tmp_path: Path) -> None:
    # As on Windows, as far as an interpreter here can be stripped.
    report = run_without(
        {
            "os": ["fork", "register_at_fork", "memfd_create"],
            "socket": ["send_fds", "recv_fds", "CMSG_SPACE", "SCM_RIGHTS"],
            "signal": ["pthread_sigmask", "SIGKILL", "SIGCHLD", "SIGALRM", "SIGQUIT", "SIGHUP"],
        },
        """
        import json
        import pool_manager
        from pool_manager import manager, pool, loky, budget, metrics, progress, memory
        from pool_manager import BaseWorkerPool, EngineUnavailableError

        try:
            BaseWorkerPool(1)
            refused = ""
        except EngineUnavailableError as error:
            refused = str(error)
        print(json.dumps({"default": pool_manager.DEFAULT_ENGINE, "refused": refused}))
        """,
        tmp_path,
    )
    assert report["default"] == "loky"
    assert "os.fork, socket.send_fds, os.memfd_create" in report["refused"]


def test_a_manager_can_be_told_to_build_every_pool_on_loky(tmp_path: Path) -> None:
    assert DEFAULT_ENGINE == "fork_server"  # (Linux)
    with WorkerPoolManager(2, 60, 600, engine="loky", task_timeout=1.0) as manager:
        assert manager.engine == "loky"
        with manager.lease("a") as pool:
            assert isinstance(pool, LokyWorkerPool)
            assert pool.submit(square, 4).result(timeout=60) == 16
            stuck = pool.submit(run_step, str(tmp_path), 0, "hang")
            with pytest.raises(TaskTimeoutError):
                stuck.result(timeout=60)
        with manager.lease("b", factory=BaseWorkerPool) as other:  # (a factory still decides)
            assert isinstance(other, BaseWorkerPool)
    with WorkerPoolManager(1, 60, 600) as manager:
        assert manager.engine == "fork_server"
        with manager.lease("a") as pool:
            assert isinstance(pool, BaseWorkerPool)


def test_engine_names_and_loky_options_are_checked() -> None:
    with pytest.raises(ValueError, match="engine must be one of fork_server, loky"):
        WorkerPoolManager(1, 60, 600, engine="threads")
    with pytest.raises(TypeError, match="engine must be"):
        WorkerPoolManager(1, 60, 600, engine=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        WorkerPoolManager(1, 60, 600, engine="loky", shared_data=threading.Lock())
    assert issubclass(EngineUnavailableError, RuntimeError)
