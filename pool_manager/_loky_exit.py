"""The loky pools at interpreter exit: as with ``ProcessPoolExecutor``, accepted
work finishes before the interpreter exits (a Ctrl-C that ends the program
terminates the pools instead).

loky registers its own exit hook (which makes its executors refuse new
tasks) each time one of its executors starts; exit hooks run last
registered, first run: so `_register_exit_hook` registers `_at_exit` again
after each slot's start, unless it is still the last, and at import. While
exiting, no loky executor can start (the interpreter refuses loky's hook
then): a pool hands its queued tasks to its ready slots
(``LokyWorkerPool._exiting``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from . import _signals
from ._loky_slots import _Actions, _Slot
from .errors import WorkerStartError

if TYPE_CHECKING:
    from .loky import LokyWorkerPool

__all__ = ["_live_pools", "_register_exit_hook", "interpreter_exiting", "plan_at_exit"]

logger = logging.getLogger("pool_manager")

#: The loky pools that have started a slot and are not disposed, for the exit hook.
_live_pools: weakref.WeakSet[LokyWorkerPool] = weakref.WeakSet()


def _at_exit() -> None:
    """As with ``ProcessPoolExecutor``, accepted work finishes before the interpreter
    exits (a Ctrl-C that ends the program terminates the pools instead).

    Registered after loky's own exit hook, so it runs first (they run last
    registered, first run): loky's refuses new tasks, and a pool's queued
    tasks are still to be handed to its slots.
    """
    interrupted = _signals._interrupted_now()
    for pool in list(_live_pools):
        actions = _Actions()
        with pool._lock:
            pool._exiting = True
            pool._plan(actions)
        pool._act(actions)
    for pool in list(_live_pools):
        try:
            if interrupted:
                pool.terminate()
            else:
                pool.shutdown(wait=True)
        except Exception:
            logger.exception("shutting a loky pool down at exit failed")


def _register_exit_hook() -> None:
    """Register `_at_exit` to run before loky's own exit hook.

    Exit hooks run last registered, first run, and loky registers its hook
    as each of its executors starts: so after each start, this one is
    registered again unless it is still the last (at import too, for a
    process whose first slot starts as it exits; then no slot can start).
    """
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks and getattr(hooks[-1], "func", None) is _at_exit:
        return
    with contextlib.suppress(RuntimeError):  # (the interpreter is already exiting)
        threading._register_atexit(_at_exit)  # type: ignore[attr-defined]


_register_exit_hook()


if hasattr(os, "register_at_fork"):  # (a forked child's copies are the parent's)
    os.register_at_fork(after_in_child=_live_pools.clear)


def interpreter_exiting() -> bool:
    """The interpreter has begun to exit (its threading exit hooks run, or later):
    from then on, Python 3.12+ starts no thread, so loky starts no executor."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False)) or sys.is_finalizing()


def plan_at_exit(pool: LokyWorkerPool, ready: list[_Slot], actions: _Actions) -> None:
    """(Holds the pool's _lock) The interpreter is exiting: every queued task goes to a ready
    slot, the least loaded first (no slot can start now); with none ready
    or starting, they fail."""
    if not ready:
        if not any(not slot.ready for slot in pool._slots):
            pool._fail_queued(
                WorkerStartError(
                    "the interpreter is exiting and the pool has no loky worker ready: loky "
                    "cannot start one now, so the task was not run (call shutdown() before "
                    "the program ends)"
                ),
                actions,
            )
        return
    while pool._waiting:
        pool._hand(min(ready, key=lambda slot: len(slot.handed)), actions)
