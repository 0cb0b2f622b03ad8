"""Signals and interpreter exit.

* SIGTERM (how services are stopped): a manager created in the main thread
  installs, once per process, a handler that lets accepted work finish and
  its futures' callbacks run within ``shutdown_grace``, then ends the workers
  still running and ends the process as SIGTERM would, or calls the handler
  the application had set before.
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


_lock = threading.Lock()
_installed = False
_previous: Any = None
_managers: Callable[[], Iterable[_Stoppable]] = list
_pools: Callable[[], Iterable[Any]] = list


def configure_managers(managers: Callable[[], Iterable[_Stoppable]]) -> None:
    """Tell this module where the live managers are (no import cycle)."""
    global _managers
    _managers = managers


def configure_pools(pools: Callable[[], Iterable[Any]]) -> None:
    """Tell this module where the live pools are (no import cycle)."""
    global _pools
    _pools = pools


def install_sigterm_handler() -> bool:
    """Install the SIGTERM handler once; False if not on the main thread."""
    global _installed, _previous
    with _lock:
        if _installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        _previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True
        return True


#: Seconds beyond ``shutdown_grace`` the SIGTERM handler waits for the
#: shutdown before it ends the process regardless.
SHUTDOWN_MARGIN = 5.0


def _stop_all(managers: list[_Stoppable], grace: float) -> None:
    deadline = time.monotonic() + grace
    for manager in managers:
        try:
            manager.shutdown_within(max(0.0, deadline - time.monotonic()))
        except Exception:
            logger.exception("SIGTERM: shutting a manager down failed")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    managers = [m for m in list(_managers()) if m.handles_signals]
    if managers:
        grace = max(m.shutdown_grace for m in managers)
        logger.warning(
            "SIGTERM: letting accepted work finish (up to %.1fs), then stopping workers", grace
        )
        # The work runs on a thread of its own: this handler interrupts the
        # main thread wherever it was, possibly inside one of our locks. If
        # the stopper cannot finish, the process ends anyway after the margin,
        # and the workers follow by their watchdogs.
        stopper = threading.Thread(
            target=_stop_all, args=(managers, grace), name="pool_manager-sigterm", daemon=True
        )
        stopper.start()
        deadline = time.monotonic() + grace + SHUTDOWN_MARGIN
        while stopper.is_alive() and (left := deadline - time.monotonic()) > 0:
            stopper.join(wait_step(left))  # (in steps: a grace of centuries overflows)
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or unknown): end as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


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
