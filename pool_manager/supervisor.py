"""The supervisor: one daemon thread per manager for every timed transition.

It owns no state of its own. It sleeps until the next deadline the manager's
last sweep reported (no polling), and wakes early when told that something
changed: a lease released, a pool gone idle, a pool retired, shutdown.
Each wake-up runs ``manager.sweep()``, the same checks a test runs by hand.

Nothing ends the thread but `stop`: a sweep that fails (whatever it raises)
is logged and tried again `SWEEP_RETRY` seconds later, and a deadline
centuries away is waited for in steps (`_durations.MAX_WAIT`), as an OS wait
cannot be that long.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from . import _threads
from ._durations import wait_step

__all__ = ["Supervisor"]

logger = logging.getLogger("pool_manager")

#: Seconds after a failed sweep before the next (a pool waiting for the
#: worker budget, or an expiry, must not wait for an unrelated wake-up).
SWEEP_RETRY = 1.0


class Supervisor:
    """Runs ``sweep()`` at each deadline it returns, on a daemon thread.

    ``sweep`` returns the clock time of the next deadline, or ``None`` when
    nothing is due until something changes (and `wake` is called).
    """

    def __init__(
        self,
        sweep: Callable[[], float | None],
        clock: Callable[[], float],
        *,
        name: str,
    ) -> None:
        self._sweep = sweep
        self._clock = clock
        # _wakeup guards _woken and _stopping.
        self._wakeup = threading.Condition(threading.Lock())
        self._woken = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Ask for a sweep now (cheap; callable from any thread)."""
        with self._wakeup:
            self._woken = True
            self._wakeup.notify()

    def stop(self, wait: bool = True) -> None:
        """Stop the thread: it sweeps no more once a sweep in progress ends.

        With ``wait``, join it (the sweep in progress may be disposing a pool).
        """
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
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
        timeout: float | None = None  # seconds until the next sweep is due
        while True:
            with self._wakeup:
                if not self._woken and not self._stopping:
                    # (A wait that ends before the deadline just sweeps early.)
                    self._wakeup.wait(wait_step(timeout))
                self._woken = False
                if self._stopping:
                    return
            # Keep supervising whatever fails: one bad pool, a listener or a
            # clock that raises must not stop expiry nor the worker budget.
            try:
                next_deadline = self._sweep()
                timeout = None if next_deadline is None else next_deadline - self._clock()
            except BaseException:
                logger.exception(
                    "pool_manager supervisor: sweep failed; trying again in %gs", SWEEP_RETRY
                )
                timeout = SWEEP_RETRY
