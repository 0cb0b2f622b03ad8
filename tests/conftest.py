"""Every test must leave no child process, thread, file descriptor or named
shared-memory segment of the library's behind, nor change the environment."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator

import psutil
import pytest

from pool_manager import _threads

from .doubles import RecordingBar


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _working(thread: threading.Thread) -> bool:
    """A thread that is not an idle callback thread of the library's.

    `_threads.CallbackRunner` keeps its threads for ``IDLE_EXIT`` seconds
    after their last job, for the next one: one of them while the runner has
    no job queued or running is the process's, not a test's (waiting for it
    to end would add a second to every test that ran a callback).
    """
    if thread.name != "pool_manager-callbacks":
        return True
    runner = _threads.get_runner()
    with runner._lock:
        return bool(runner._ready or runner._running)


def _segments() -> set[str]:
    """This process's named shared-memory segments (the loky engine's ``shared_data``:
    ``_loky_shared.NAME_PREFIX``, then the pid)."""
    prefix = f"pool_manager_{os.getpid()}_"
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    except OSError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def _multiprocessing_resource_tracker() -> Iterator[None]:
    """Start multiprocessing's resource tracker once, and loky's: they live as long as
    the interpreter.

    (Tests that start a ``multiprocessing`` process, a ``Manager`` say, start
    the first; the first loky worker starts the second.)
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    try:  # (and loky's own, which its workers start as the first one boots)
        from loky.backend import resource_tracker as loky_resource_tracker
    except ImportError:
        pass
    else:
        loky_resource_tracker.ensure_running()
    yield


@pytest.fixture(autouse=True)
def no_leaks(_multiprocessing_resource_tracker: None) -> Iterator[None]:
    """Fail a test that leaves a child process, a thread, a descriptor or a
    segment behind."""
    children = _children()
    threads = set(threading.enumerate())
    fds = _fds()
    segments = _segments()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    environ = dict(os.environ)
    yield
    # (Every later worker and subprocess would inherit a variable left set.)
    # (pytest's own PYTEST_CURRENT_TEST aside.)
    changed = sorted(
        key
        for key in set(environ) | set(os.environ)
        if environ.get(key) != os.environ.get(key) and key != "PYTEST_CURRENT_TEST"
    )
    for key in changed:
        if key in environ:
            os.environ[key] = environ[key]
        else:
            del os.environ[key]
    # (The test's thread: a mask left blocking SIGTERM is inherited by every
    # process started after, whose main thread then never takes it.)
    mask_after = signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    deadline = time.monotonic() + 15.0
    while True:
        new_children = _children() - children
        new_threads = [
            t for t in threading.enumerate() if t not in threads and t.is_alive() and _working(t)
        ]
        new_fds = _fds() - fds
        new_segments = _segments() - segments
        if (
            not (new_children or new_threads or new_fds or new_segments)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    for pid in new_children:  # end what this test started, so the next one starts clean
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    problems = []
    if changed:
        problems.append(f"environment variables changed: {changed}")
    if mask_after != mask:
        problems.append(f"signal mask changed: {sorted(mask)} -> {sorted(mask_after)}")
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
    if new_segments:
        problems.append(f"shared-memory segments left in /dev/shm: {sorted(new_segments)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordingBar]]:
    """Progress bars drawn during the test, as `RecordingBar` records them (tqdm
    replaced by it: nothing is drawn, and tqdm need not be installed)."""
    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = RecordingBar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    RecordingBar.made = []
    yield RecordingBar.made
