"""The supervisor: one daemon thread per manager for every timed transition.

It owns no state of its own. It sleeps until the next deadline the manager's
last sweep reported (no polling), and wakes early when told that something
changed: a lease released, a pool gone idle, a pool retired, shutdown.
Each wake-up runs ``manager.sweep()``, the same checks a test runs by hand.

Nothing ends the thread but `stop`, or its manager's end: a sweep that
fails (whatever it raises) is logged and tried again `SWEEP_RETRY` seconds
later, and a deadline centuries away is waited for in steps
(`_durations.MAX_WAIT`), as an OS wait cannot be that long.

The thread holds its manager weakly (but during a sweep): a manager dropped
without ``shutdown()`` is collected, as a ``ProcessPoolExecutor`` is, and
its thread then lets go of what the manager held (``on_gone``) and ends.
Wake-ups travel by a ``queue.SimpleQueue``, whose ``put`` may be called
from a weakref callback, at any point of any thread, without a lock.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import signal
import threading
import weakref
from collections.abc import Callable

from . import _process, _threads
from ._durations import wait_step

__all__ = ["Supervisor"]

logger = logging.getLogger("pool_manager")

#: Seconds after a failed sweep before the next (a pool waiting for the
#: worker budget, or an expiry, must not wait for an unrelated wake-up).
SWEEP_RETRY = 1.0


class Supervisor:
    """Runs ``sweep()`` at each deadline it returns, on a daemon thread.

    ``sweep`` returns the clock time of the next deadline, or ``None`` when
    nothing is due until something changes (and `wake` is called). A bound
    method is held weakly: when its object is collected, the thread calls
    ``on_gone`` (if given) and ends.
    """

    def __init__(
        self,
        sweep: Callable[[], float | None],
        clock: Callable[[], float],
        *,
        name: str,
        on_gone: Callable[[], object] | None = None,
    ) -> None:
        self._wakeups: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._sweep: Callable[[], Callable[[], float | None] | None]
        if inspect.ismethod(sweep):
            wakeups = self._wakeups
            self._sweep = weakref.WeakMethod(sweep, lambda _: wakeups.put(False))
        else:
            self._sweep = lambda: sweep
        self._clock = clock
        self._on_gone = on_gone
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        # Started with SIGINT/SIGTERM blocked (it inherits the mask): else a
        # signal that came before its first line blocks them would be taken
        # here, and never wake the main thread (see _process.signals_blocked).
        with _process.signals_blocked():
            self._thread.start()

    def wake(self) -> None:
        """Ask for a sweep now (cheap; callable from any thread)."""
        self._wakeups.put(True)

    def stop(self, wait: bool = True) -> None:
        """Stop the thread: it sweeps no more once a sweep in progress ends.

        With ``wait``, join it (the sweep in progress may be disposing a pool).
        """
        self._stopping = True
        self._wakeups.put(False)
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        _threads.mark_library_thread()
        # Leave SIGINT/SIGTERM to the main thread (see _process.signals_blocked).
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        wakeups = self._wakeups
        timeout: float | None = None  # seconds until the next sweep is due
        while True:
            # (A wait that ends before the deadline just sweeps early; the
            # wake-ups that came meanwhile are one.)
            with contextlib.suppress(queue.Empty):
                wakeups.get(timeout=wait_step(timeout))
                while True:
                    wakeups.get_nowait()
            if self._stopping:
                return
            sweep = self._sweep()
            if sweep is None:  # the manager was collected
                self._owner_gone()
                return
            # Keep supervising whatever fails: one bad pool, a listener or a
            # clock that raises must not stop expiry nor the worker budget.
            try:
                next_deadline = sweep()
                timeout = None if next_deadline is None else next_deadline - self._clock()
            except BaseException:
                logger.exception(
                    "pool_manager supervisor: sweep failed; trying again in %gs", SWEEP_RETRY
                )
                timeout = SWEEP_RETRY
            del sweep  # (between sweeps the manager is not held)

    def _owner_gone(self) -> None:
        if self._on_gone is not None:
            try:
                self._on_gone()
            except BaseException:
                logger.exception("pool_manager supervisor: releasing a collected manager failed")
