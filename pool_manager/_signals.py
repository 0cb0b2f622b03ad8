"""Signals and interpreter exit.

* SIGTERM (how services are stopped): a manager created in the main thread
  installs, once per process, a handler that lets accepted work finish and
  its futures' callbacks run within ``shutdown_grace``, then ends the workers
  still running and ends the process as SIGTERM would, or calls the handler
  the application had set before. The handler itself only wakes the drainer
  thread and returns: the main thread may have been interrupted holding a
  lock the shutdown needs. When the drain is over, the drainer sends SIGTERM
  again, and the handler, on the main thread, does what SIGTERM did before.
* Interpreter exit: as with ``ProcessPoolExecutor``, accepted work finishes
  before the interpreter exits, and no worker outlives it: an exit hook
  (``threading._register_atexit``, which runs while threads still run) shuts
  every live pool down and waits. But a ``KeyboardInterrupt`` that ends the
  program must not leave it waiting for a backlog: then the hook terminates
  every pool instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Protocol

from ._durations import wait_step

logger = logging.getLogger("pool_manager")


class _Stoppable(Protocol):
    handles_signals: bool
    shutdown_grace: float

    def shutdown_within(self, grace: float) -> None: ...

    def terminate(self) -> None: ...


_lock = threading.Lock()  # (never taken by the signal handler)
_installed = False
_previous: Any = None
_managers: Callable[[], Iterable[_Stoppable]] = list
_pools: Callable[[], Iterable[Any]] = list

# The drainer: a thread of ours that does the graceful shutdown SIGTERM asks
# for. The handler only wakes it, by a byte on a socket (no lock, no thread
# start: the handler runs on the main thread wherever it was interrupted,
# possibly inside one of our locks or threading's). It runs while a manager
# that handles signals lives (`install_sigterm_handler` to `release`).
_drainer: threading.Thread | None = None
_drainer_pid = 0
_wake: socket.socket | None = None
#: "idle", "draining", or "drained": the drain is over and the SIGTERM the
#: drainer sent itself is due on the main thread, which then ends the process
#: as SIGTERM would or calls the application's previous handler there.
_state = "idle"
_DRAIN = b"d"
_QUIT = b"q"


def configure_managers(managers: Callable[[], Iterable[_Stoppable]]) -> None:
    """Tell this module where the live managers are (no import cycle)."""
    global _managers
    _managers = managers


def configure_pools(pools: Callable[[], Iterable[Any]]) -> None:
    """Tell this module where the live pools are (no import cycle)."""
    global _pools
    _pools = pools


def install_sigterm_handler() -> bool:
    """Install the SIGTERM handler once; False if not on the main thread.

    Also starts the drainer thread if none runs in this process; a manager
    that got True calls `release` when it closes.
    """
    global _installed, _previous
    with _lock:
        if not _installed:
            if threading.current_thread() is not threading.main_thread():
                return False
            _previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            _installed = True
        _start_drainer()
        return True


def _start_drainer() -> None:
    global _drainer, _drainer_pid, _wake, _state
    if _drainer is not None and _drainer_pid == os.getpid() and _drainer.is_alive():
        return
    # (In a forked child the parent's drainer does not exist: start one.)
    receive, wake = socket.socketpair()
    wake.setblocking(False)
    _drainer = threading.Thread(
        target=_drain_loop, args=(receive,), name="pool_manager-sigterm", daemon=True
    )
    _wake, _drainer_pid, _state = wake, os.getpid(), "idle"
    # Started with the signals blocked (it inherits the mask; `_drain_loop`
    # blocks them again): a SIGTERM that came before its first line would be
    # taken by it and never wake the main thread from a sleep.
    previous = _block_signals()
    try:
        _drainer.start()
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _block_signals() -> set[int | signal.Signals] | None:
    """Block SIGINT/SIGTERM in this thread; returns the mask to restore (None: no masks)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def release() -> None:
    """(A manager that handled signals closed) stop the drainer if no such manager is left."""
    global _drainer, _wake
    with _lock:
        drainer, wake = _drainer, _wake
        if drainer is None or wake is None or _drainer_pid != os.getpid():
            return
        if any(m.handles_signals for m in list(_managers())):
            return
        _drainer = _wake = None
        with contextlib.suppress(OSError):
            wake.send(_QUIT)  # (after a drain in progress, if any: bytes come in order)
        # The drainer itself (shutting managers down) or a drain in progress
        # must not be waited for here; the drainer closes its own end.
        if drainer is not threading.current_thread() and _state == "idle":
            drainer.join()
        wake.close()


#: Seconds beyond ``shutdown_grace`` the drainer waits for the shutdown
#: before it ends the process regardless.
SHUTDOWN_MARGIN = 5.0


def _stop_all(managers: list[_Stoppable], grace: float) -> None:
    deadline = time.monotonic() + grace
    for manager in managers:
        try:
            manager.shutdown_within(max(0.0, deadline - time.monotonic()))
        except Exception:
            logger.exception("SIGTERM: shutting a manager down failed")


def _drain_loop(receive: socket.socket) -> None:
    from . import _threads  # (no import cycle at module level)

    _threads.mark_library_thread()
    if hasattr(signal, "pthread_sigmask"):  # leave the signals to the main thread
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        while receive.recv(1) == _DRAIN:
            _drain()
    finally:
        receive.close()


def _drain() -> None:
    global _state
    managers = [m for m in list(_managers()) if m.handles_signals]
    if managers:
        grace = max(m.shutdown_grace for m in managers)
        logger.warning(
            "SIGTERM: letting accepted work finish (up to %.1fs), then stopping workers", grace
        )
        # The shutdown runs on a thread of its own: if it cannot finish (the
        # main thread stopped inside one of our locks), the process ends
        # anyway after the margin, and the workers follow by their watchdogs.
        stopper = threading.Thread(
            target=_stop_all, args=(managers, grace), name="pool_manager-sigterm-stop", daemon=True
        )
        stopper.start()
        deadline = time.monotonic() + grace + SHUTDOWN_MARGIN
        while stopper.is_alive() and (left := deadline - time.monotonic()) > 0:
            stopper.join(wait_step(left))  # (in steps: a grace of centuries overflows)
    if _previous == signal.SIG_IGN:
        _state = "idle"
        return
    # What follows (SIG_DFL, or the application's handler) belongs on the
    # main thread: send the signal again; the handler sees "drained".
    _state = "drained"
    os.kill(os.getpid(), signal.SIGTERM)


def _chain(signum: int, frame: FrameType | None) -> None:
    """(On the main thread) what SIGTERM did before our handler: theirs, or the default."""
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or unknown): end as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Runs on the main thread wherever it was interrupted: it takes no lock
    # and waits for nothing; the drainer does the work and sends SIGTERM
    # again when done.
    global _state
    if _state == "draining" and _drainer_pid == os.getpid():
        return  # (a drain is on its way; it ends the process when done)
    if _state == "drained" and _drainer_pid == os.getpid():
        _state = "idle"
        _chain(signum, frame)
        return
    wake = _wake
    if (
        wake is None
        or _drainer_pid != os.getpid()
        or not any(m.handles_signals for m in list(_managers()))
    ):
        _chain(signum, frame)
        return
    _state = "draining"
    try:
        wake.send(_DRAIN)
    except OSError:  # (the drainer stopped meanwhile: nothing to drain)
        _state = "idle"
        _chain(signum, frame)


def _interactive() -> bool:
    """Whether a REPL or IPython/Jupyter runs: there Ctrl-C never ends the program."""
    if sys.flags.interactive or hasattr(sys, "ps1"):
        return True
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    try:
        return callable(get_ipython) and get_ipython() is not None
    except Exception:
        return False


def _interrupted_now() -> bool:
    """Whether a ``KeyboardInterrupt`` is ending the program now.

    Python records an uncaught exception in sys.last_value (3.12: last_exc)
    before it shuts threads down and runs the exit hooks. But a REPL (and
    IPython, Jupyter) records there every exception it prints, a Ctrl-C the
    user recovered from long ago included, and a Ctrl-C never ends it: an
    interactive session always exits normally.
    """
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(last, KeyboardInterrupt) and not _interactive()


def _on_interpreter_exit() -> None:
    if not _interrupted_now():
        # A normal exit: accepted work finishes, as ProcessPoolExecutor does.
        for pool in list(_pools()):
            try:
                pool.shutdown(wait=True)
            except Exception:
                logger.exception("shutting a pool down at exit failed")
        return
    for manager in list(_managers()):
        manager.terminate()
    for pool in list(_pools()):
        pool.terminate()


with contextlib.suppress(RuntimeError):  # (the interpreter is already shutting down)
    threading._register_atexit(_on_interpreter_exit)  # type: ignore[attr-defined]
