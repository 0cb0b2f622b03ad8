"""Code that runs inside worker processes.

Kept tiny and importable by reference, so that a task ships as
``(helper, fn, args)`` and only ``fn`` and its arguments are pickled.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

#: Seconds between two checks of a worker's parent; a worker outlives a
#: parent that died (even by SIGKILL) by at most about this long.
PARENT_CHECK_INTERVAL = 0.25

#: The exit status of a worker that stopped because its parent died.
ORPHAN_EXIT_CODE = 75


def start_worker(
    parent_pid: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    """Run first in every worker process, before the user's initializer.

    * SIGINT is ignored: a Ctrl-C in a terminal reaches the whole process
      group, and it is the parent's to handle (it stops the workers).
    * A daemon thread exits the process as soon as its parent is gone. loky's
      workers never watch their parent, and ``PR_SET_PDEATHSIG`` fires when
      the spawning *thread* exits, not the process, so polling
      ``os.getppid()`` is the robust way to leave no orphans.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watchdog = threading.Thread(
        target=_exit_when_orphaned,
        args=(parent_pid,),
        name="pool_manager-parent-watchdog",
        daemon=True,
    )
    watchdog.start()
    if initializer is not None:
        initializer(*initargs)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(ORPHAN_EXIT_CODE)


def call_with_kwargs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``fn(*args, **kwargs)``; lets a task take keywords named ``fn`` or ``self``."""
    return fn(*args, **kwargs)


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn`` over one chunk of ``map`` arguments, in order."""
    return [fn(*args) for args in chunk]
