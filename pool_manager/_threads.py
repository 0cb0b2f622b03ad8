"""The threads that must never stall, and the two rules that keep them going.

The library's own threads (the process's I/O loop and worker starter, its
callback threads, each manager's supervisor) mark themselves with
`mark_library_thread`. Together with any thread that is running an asyncio
event loop (the application's, or a Dask client's, which delivers a Dask
pool's answers), they are the threads on which a wait could stall everyone:
the I/O loop is the only one that can make room in a pool, and a blocked
event loop stops every coroutine. The I/O loop and the starter are
*service* threads, which every pool relies on: no user code runs there at
all (`on_service_thread`); the futures they settle hand their done-callbacks
to `CallbackRunner`, whose threads run each pool's in order.

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

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any

from . import _process

__all__ = [
    "CallbackRunner",
    "as_library_thread",
    "GuardedCallbacksFuture",
    "Strand",
    "call_guarded",
    "defer",
    "get_runner",
    "mark_library_thread",
    "must_not_stall",
    "on_service_thread",
    "run_deferred",
]

logger = logging.getLogger("pool_manager")

_local = threading.local()


def mark_library_thread(service: bool = False) -> None:
    """(First thing on a thread of the library's own) count it among those that must not stall.

    ``service``: a thread every pool of the process relies on (the I/O loop,
    the worker starter), where no user code may run at all (`on_service_thread`).
    """
    _local.library = True
    _local.service = service
    if service:
        _local.deferred = {}


@contextlib.contextmanager
def as_library_thread() -> Iterator[None]:
    """Count this thread among those that must not stall for the block only (an
    engine's answer settled at once on the caller's thread, as on the
    engine's own: its done-callbacks' submits are never held there)."""
    before = getattr(_local, "library", False)
    _local.library = True
    try:
        yield
    finally:
        _local.library = before


def defer(work: Callable[[], object]) -> None:
    """On a service thread, run ``work`` once when the thread ends its current
    round (`run_deferred`: the I/O loop's, before it waits again), however
    often it is deferred meanwhile; on any other thread, now.

    It is how the I/O loop coalesces what many results in one round ask for
    (the worker budget's rebalance) into one call.
    """
    deferred: dict[Callable[[], object], None] | None = getattr(_local, "deferred", None)
    if deferred is None:
        work()
    else:
        deferred[work] = None  # (an ordered set: a bound method is equal to itself)


def run_deferred() -> None:
    """(A service thread, at the end of its round) run what was deferred, in order."""
    deferred: dict[Callable[[], object], None] = _local.deferred
    while deferred:
        work = next(iter(deferred))
        del deferred[work]
        try:
            work()
        except Exception:
            logger.exception("pool_manager: deferred work failed")


def on_service_thread() -> bool:
    """True on the I/O loop's thread and the worker starter's: user code never
    runs there (done-callbacks go to `CallbackRunner`), nothing waits there
    for a pool's I/O."""
    return getattr(_local, "service", False)


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
    end a callback thread, and the future's later callbacks (an asyncio
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

    def settle_quietly(self, ok: bool, value: Any) -> list[Callable[[Future[Any]], object]]:
        """``set_result(value)`` (``ok``) or ``set_exception(value)``, without
        running the done-callbacks: they are returned, to be run elsewhere
        (`run_callbacks`), in order. Waiters (``result()``, ``wait``,
        ``as_completed``) wake at once.

        (What ``Future.set_result`` does but for its last step, on
        ``Future``'s own fields, which every Python since 3.8 shares.)

        Raises:
            InvalidStateError: the future is already done or cancelled.
        """
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                raise InvalidStateError(f"{self._state}: {self!r}")
            if ok:
                self._result = value
            else:
                self._exception = value
            self._state = FINISHED
            for waiter in self._waiters:
                if ok:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            self._condition.notify_all()
            callbacks: list[Callable[[Future[Any]], object]] = self._done_callbacks
            self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        return callbacks


_futures_logger = logging.getLogger("concurrent.futures")


def run_callbacks(settled: list[tuple[Future[Any], list[Callable[[Future[Any]], object]]]]) -> None:
    """Run the done-callbacks `GuardedCallbacksFuture.settle_quietly` returned,
    each future's in order; an exception is logged as ``Future`` logs it."""
    for future, callbacks in settled:
        for callback in callbacks:
            try:
                callback(future)
            except Exception:
                _futures_logger.exception("exception calling callback for %r", future)


class Strand:
    """Jobs that run one at a time, in the order given (a pool's callbacks),
    on `CallbackRunner`'s threads. Guarded by the runner's lock."""

    __slots__ = ("jobs", "scheduled")

    def __init__(self) -> None:
        self.jobs: deque[Callable[[], object]] = deque()
        self.scheduled = False  # in the runner's queue, or running


class CallbackRunner:
    """Where the service threads send user code: done-callbacks, event callbacks.

    Each `Strand` runs its jobs one at a time, in order (a pool's callbacks
    run as they would on one thread of its own); strands run side by side
    on up to ``THREADS`` threads (``pool_manager-callbacks``), and on more
    when every one of those is stuck in a callback for over ``STUCK``
    seconds as another strand waits: a callback that blocks holds up its own
    pool's callbacks, not every pool's. A thread idle for ``IDLE_EXIT``
    seconds ends. A job's exception is logged (`call_guarded`).
    """

    THREADS = 4
    STUCK = 0.1
    IDLE_EXIT = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._ready: deque[Strand] = deque()  # strands with a job, not running
        self._threads = 0
        self._idle = 0  # threads waiting for work
        self._running: dict[int, float] = {}  # thread ident -> time.monotonic() its job began

    def run(self, strand: Strand, job: Callable[[], object]) -> None:
        """Run ``job`` after the strand's earlier jobs, on a runner thread. Never waits."""
        with self._lock:
            strand.jobs.append(job)
            if strand.scheduled:
                return
            strand.scheduled = True
            self._ready.append(strand)
            if self._idle:
                self._work.notify()
                return
            if self._threads >= self.THREADS and not self._all_stuck():
                return  # (a thread takes it as it finishes its job)
            self._threads += 1
        thread = threading.Thread(target=self._serve, name="pool_manager-callbacks", daemon=True)
        try:
            with _process.signals_blocked():
                thread.start()
        except RuntimeError:  # (out of threads)
            with self._lock:
                self._threads -= 1
                alone = self._threads == 0
            if alone:
                self._serve(inline=True)  # no thread at all: run it here, rather than never

    def _all_stuck(self) -> bool:
        since = time.monotonic() - self.STUCK
        return len(self._running) >= self._threads and all(
            began < since for began in self._running.values()
        )

    def _serve(self, inline: bool = False) -> None:
        if not inline:
            mark_library_thread()
        me = threading.get_ident()
        with self._lock:
            while True:
                if not self._ready:
                    if inline:
                        return
                    self._idle += 1
                    signalled = self._work.wait(self.IDLE_EXIT)
                    self._idle -= 1
                    if not self._ready:
                        if not signalled:
                            self._threads -= 1
                            return
                        continue
                strand = self._ready.popleft()
                job = strand.jobs.popleft()
                self._running[me] = time.monotonic()
                self._lock.release()
                try:
                    call_guarded(job, failed="a pool_manager callback failed")
                finally:
                    self._lock.acquire()
                    del self._running[me]
                    if strand.jobs:
                        self._ready.append(strand)
                    else:
                        strand.scheduled = False


_runner = CallbackRunner()


def get_runner() -> CallbackRunner:
    """This process's `CallbackRunner`."""
    return _runner


def _new_runner_in_child() -> None:
    global _runner
    _runner = CallbackRunner()  # (the parent's threads are not in the child)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_runner_in_child)
