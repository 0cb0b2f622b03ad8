"""The threads that must never stall, and the two rules that keep them going.

The library's own threads (each pool's I/O thread, each manager's
supervisor) mark themselves with `mark_library_thread`. Together with any
thread that is running an asyncio event loop (the application's, or a Dask
client's, which delivers a Dask pool's answers), they are the threads on
which a wait could stall everyone: the I/O thread is the only one that can
make room in its pool, and a blocked event loop stops every coroutine.

- **Backpressure never holds them.** A ``submit`` on such a thread (from a
  done-callback, an idle or event callback, ``loop.run_in_executor``) is
  admitted at once, beyond ``max_pending``: nothing is lost and nothing
  waits for room that only this thread could make.
- **A user callback cannot end them.** Whatever a callback run there raises,
  ``SystemExit`` and other ``BaseException`` included, is logged on the
  ``"pool_manager"`` logger and ignored, and the callbacks after it still
  run (`call_guarded`, `GuardedCallbacksFuture`). On the application's own
  threads an ``Exception`` is logged the same way, but a ``BaseException``
  (a Ctrl-C) goes on up, as anywhere in Python.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["GuardedCallbacksFuture", "call_guarded", "mark_library_thread", "must_not_stall"]

logger = logging.getLogger("pool_manager")

_local = threading.local()


def mark_library_thread() -> None:
    """(First thing on a thread of the library's own) count it among those that must not stall."""
    _local.library = True


def must_not_stall() -> bool:
    """True on the library's own threads and on a thread running an asyncio event loop."""
    if getattr(_local, "library", False):
        return True
    asyncio = sys.modules.get("asyncio")  # not imported: no loop can be running
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def call_guarded(callback: Callable[..., object], *args: Any, failed: str) -> None:
    """``callback(*args)``; what it raises is logged with the line ``failed``.

    An ``Exception`` is logged on any thread; a ``BaseException`` is logged
    on a thread that `must_not_stall`, and raised on any other.
    """
    try:
        callback(*args)
    except Exception:
        logger.exception("%s", failed)
    except BaseException:
        if not must_not_stall():
            raise
        logger.exception("%s (on a pool_manager thread, which goes on)", failed)


class GuardedCallbacksFuture(Future):  # type: ignore[type-arg]
    """A ``Future`` whose done-callbacks cannot end the thread that settles it.

    ``Future`` itself logs an ``Exception`` from a done-callback, but a
    ``BaseException`` (``SystemExit``, say) escapes ``set_result``: it would
    end a pool's I/O thread, and the future's later callbacks (an asyncio
    waiter's among them) would never run. Here, on a thread that
    `must_not_stall`, such an exception is logged too.
    """

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        def guarded(future: Future[Any]) -> None:
            try:
                fn(future)
            except Exception:
                raise  # Future logs it, as it does for any future
            except BaseException:
                if not must_not_stall():
                    raise
                logger.exception(
                    "a done-callback of %r raised an exception (ignored, on a pool_manager thread)",
                    future,
                )

        super().add_done_callback(guarded)
