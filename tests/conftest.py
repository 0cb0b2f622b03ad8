"""Every test must leave no child process, thread, file descriptor or slot directory behind."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from pool_manager import BaseWorkerPool


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _slot_dirs() -> set[str]:
    """The workers' slot directories of pools of this process."""
    pattern = f"pool_manager-{os.getpid()}-*"
    return set(glob.glob(os.path.join(tempfile.gettempdir(), pattern))) | set(
        glob.glob(os.path.join("/dev/shm", pattern))
    )


@pytest.fixture(scope="session", autouse=True)
def _loky_resource_tracker() -> Iterator[None]:
    """Start loky's resource tracker once: it lives as long as the interpreter."""
    with BaseWorkerPool(1) as pool:
        pool.submit(int).result()
    yield


@pytest.fixture(autouse=True)
def no_leaks(_loky_resource_tracker: None) -> Iterator[None]:
    """Fail a test that leaves a child process, a thread or a descriptor behind."""
    children = _children()
    threads = set(threading.enumerate())
    fds = _fds()
    slot_dirs = _slot_dirs()
    yield
    deadline = time.monotonic() + 15.0
    while True:
        new_children = _children() - children
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        new_fds = _fds() - fds
        new_dirs = _slot_dirs() - slot_dirs
        if not (new_children or new_threads or new_fds or new_dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in new_children:  # end what this test started, so the next one starts clean
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    problems = []
    if new_children:
        problems.append(f"child processes left: {sorted(new_children)}")
    if new_threads:
        problems.append(f"threads left: {[t.name for t in new_threads]}")
    if new_fds:
        targets = []
        for fd in sorted(new_fds):
            try:
                targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                targets.append(fd)
        problems.append(f"file descriptors left: {targets}")
    if new_dirs:
        problems.append(f"slot directories left: {sorted(new_dirs)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
