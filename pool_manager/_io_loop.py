"""The process's I/O loop: one thread serves every pool's worker sockets and status pipes.

A pool with live workers is *attached* to the loop (`IOLoop.attach`, when
its first worker starts) and detaches itself once its last worker has
exited. However many pools are busy, the parent has one I/O thread
(``pool_manager-io``), which runs only while some pool is attached.

The loop does the pools' I/O and their time-driven checks, and nothing else:

- it calls ``pool._io_round(selector)`` for a pool that said it changed
  (`IOLoop.changed`: a new worker to register, output waiting) or whose
  next deadline (a task's timeout, an idle worker's ``idle_timeout``, a
  memory check) has come; the pool answers with how long it may wait,
  ``math.inf`` for no deadline, or None once it has no worker left (it has
  detached);
- it calls ``pool._io_events(events, selector)`` with the pool's ready
  sockets and pipes, and ``pool._io_failed(error, selector)`` if either
  raised (a bug: the pool ends its workers and fails their tasks).

It holds each pool weakly: a pool dropped without ``shutdown()`` is
collected, its finalizer tells the loop (`IOLoop.abandon_nowait`, which
never waits), and the loop closes that pool's worker sockets and pipes (an
idle worker exits when its socket closes) and lets the fork server go.

User code never runs here: the pools settle futures on the loop without
running their done-callbacks, which go to `_threads.CallbackRunner`.

Locks: the loop's ``_lock`` is innermost (nothing is called under it); a
pool calls `attach` and `changed` with its own lock held. The loop thread
calls into a pool with no lock of the loop's held.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import selectors
import threading
import time
import weakref
from typing import Any, Protocol

from . import _buffers, _process, _threads
from ._durations import wait_step

__all__ = ["IOLoop", "LoopClient", "get_loop", "on_loop_thread"]

Events = list[tuple[selectors.SelectorKey, int]]


class LoopClient(Protocol):
    """What the loop needs of a pool (its methods take the pool's lock themselves)."""

    def _io_round(self, selector: selectors.BaseSelector) -> float | None: ...

    def _io_events(self, events: Events, selector: selectors.BaseSelector) -> None: ...

    def _io_failed(self, error: BaseException, selector: selectors.BaseSelector) -> None: ...

    def _io_detached(self) -> None: ...


class Abandonable(Protocol):
    """What the loop does for a collected pool (see `_pool_io._Remains`)."""

    def abandoned(self, selector: selectors.BaseSelector) -> None: ...


class _Attached:
    """A pool attached to the loop."""

    __slots__ = ("due", "ref", "remains")

    def __init__(self, ref: weakref.ReferenceType[Any], remains: Abandonable) -> None:
        self.ref = ref
        self.remains = remains
        self.due: float | None = None  # time.monotonic() of its next round (None: none)


class _Run:
    """One run of the loop's thread: its selector and wake-up pipe, made as it
    starts and closed as it ends (so that an idle process holds neither)."""

    __slots__ = ("selector", "thread", "wake_read", "wake_write")

    def __init__(self) -> None:
        wake_read, wake_write = os.pipe()
        try:
            os.set_blocking(wake_read, False)
            os.set_blocking(wake_write, False)
            self.selector = selectors.DefaultSelector()
        except BaseException:
            os.close(wake_read)
            os.close(wake_write)
            raise
        self.wake_read = wake_read
        self.wake_write = wake_write
        self.thread: threading.Thread | None = None
        try:
            self.selector.register(wake_read, selectors.EVENT_READ, None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.selector.close()
        for fd in (self.wake_read, self.wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


class IOLoop:
    """The I/O loop of this process (see the module docstring); `get_loop` returns it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[int, _Attached] = {}  # attached pools, by token
        self._dirty: set[int] = set()  # pools to give a round to, by token
        #: Tokens of pools collected while attached: appended by finalizers,
        #: without a lock (list.append is atomic).
        self._abandoned: list[int] = []
        self._tokens = itertools.count(1)
        self._run: _Run | None = None
        self._wake_pending = False  # a wake-up byte is in the pipe
        # The thread is in a round: it looks at _dirty again before it waits,
        # so `changed` need not write to the pipe.
        self._awake = False
        #: (time.monotonic(), token) of each pool's next round; stale entries
        #: (a later time than the pool's ``due``) are skipped.
        self._heap: list[tuple[float, int]] = []

    # -- from pools (any thread, a pool's lock maybe held) --------------------

    def attach(self, pool: LoopClient, remains: Abandonable) -> int:
        """Serve ``pool`` from now on; returns its token (for `changed`).

        Starts the loop's thread if it is not running.

        Raises:
            OSError: no descriptors for the thread's selector and pipe.
            RuntimeError: the thread could not start.
        """
        with self._lock:
            run = self._run
            if run is None:
                run = _Run()
                thread = threading.Thread(
                    target=self._serve, args=(run,), name="pool_manager-io", daemon=True
                )
                try:
                    with _process.signals_blocked():
                        thread.start()
                except BaseException:
                    run.close()
                    raise
                run.thread = thread
                self._run = run
                self._wake_pending = False
            token = next(self._tokens)
            self._clients[token] = _Attached(weakref.ref(pool), remains)
            self._dirty.add(token)
            self._wake_locked(run)
        return token

    def changed(self, token: int) -> None:
        """Give the pool of ``token`` a round soon (it has a new worker, or output)."""
        with self._lock:
            self._dirty.add(token)
            run = self._run
            if run is not None and not self._wake_pending and not self._awake:
                self._wake_locked(run)

    def in_round(self) -> bool:
        """The thread is serving a round (not waiting): what a pool asks of it
        with `changed` now is seen before it waits again. (A hint: read
        without the lock.)"""
        return self._awake

    def _wake_locked(self, run: _Run) -> None:
        self._wake_pending = True
        with contextlib.suppress(OSError):
            os.write(run.wake_write, b"\0")

    def abandon_nowait(self, token: int) -> None:
        """(A pool's finalizer: any thread, any moment) the pool of ``token`` was
        collected. Takes no lock it must wait for: if the loop's lock is held,
        its holder is the loop (which looks at the abandoned pools after it
        lets go of the lock) or a pool that wakes the loop."""
        self._abandoned.append(token)
        if self._lock.acquire(blocking=False):
            try:
                run = self._run
                if run is not None:
                    self._wake_locked(run)
            finally:
                self._lock.release()

    def thread(self) -> threading.Thread | None:
        run = self._run
        return None if run is None else run.thread

    # -- the loop's thread -----------------------------------------------------

    def _serve(self, run: _Run) -> None:
        _threads.mark_library_thread(service=True)
        selector = run.selector
        timeout: float | None = 0.0
        _buffers.keep_spares(True)
        try:
            while True:
                events = selector.select(wait_step(timeout))
                by_pool: dict[int, Events] = {}
                for key, mask in events:
                    worker = key.data
                    if worker is None:
                        with contextlib.suppress(OSError):
                            while os.read(run.wake_read, 4096):
                                pass
                    else:
                        by_pool.setdefault(worker.owner, []).append((key, mask))
                with self._lock:
                    dirty, self._dirty = self._dirty, set()
                    self._wake_pending = False
                    self._awake = True
                for token, pool_events in by_pool.items():
                    self._serve_events(token, pool_events, selector)
                    dirty.add(token)  # (what it read may change its deadlines)
                now = time.monotonic()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    when, token = heapq.heappop(heap)
                    client = self._clients.get(token)
                    if client is not None and client.due == when:
                        client.due = None
                        dirty.add(token)
                for token in dirty:
                    self._round(token, selector)
                while self._abandoned:
                    self._abandon(self._abandoned.pop(), selector)
                _threads.run_deferred()  # (the budget's rebalance, once a round)
                spares = _buffers.trim_spares()
                with self._lock:
                    if not self._clients and not self._dirty and not self._abandoned:
                        self._run = None  # (attach starts a new run)
                        self._awake = False
                        self._heap.clear()
                        return
                    more = bool(self._dirty or self._abandoned)
                    self._awake = more  # (else it waits: `changed` wakes it)
                timeout = None
                heap = self._heap
                if more:
                    timeout = 0.0
                elif heap:
                    if len(heap) > 2 * len(self._clients) + 64:
                        self._compact()
                        heap = self._heap
                    if heap:
                        timeout = heap[0][0] - time.monotonic()
                if spares:  # (back to trim them)
                    timeout = min(_buffers.SPARE_AGE, math.inf if timeout is None else timeout)
        finally:
            _buffers.keep_spares(False)
            run.close()

    def _serve_events(self, token: int, events: Events, selector: selectors.BaseSelector) -> None:
        client = self._clients.get(token)
        if client is None:
            return  # (detached: a stale event of a worker it closed)
        pool = client.ref()
        if pool is None:
            self._abandon(token, selector)
            return
        try:
            pool._io_events(events, selector)
        except BaseException as error:
            pool._io_failed(error, selector)

    def _round(self, token: int, selector: selectors.BaseSelector) -> None:
        client = self._clients.get(token)
        if client is None:
            return
        pool = client.ref()
        if pool is None:
            self._abandon(token, selector)
            return
        try:
            wait = pool._io_round(selector)
        except BaseException as error:
            pool._io_failed(error, selector)
            with self._lock:
                self._dirty.add(token)  # (then it ends at once if no worker is left)
            return
        if wait is None:
            del self._clients[token]
            pool._io_detached()
            return
        if wait < math.inf:
            when = time.monotonic() + max(0.0, wait)
            if client.due is None or when < client.due:
                client.due = when
                heapq.heappush(self._heap, (when, token))

    def _abandon(self, token: int, selector: selectors.BaseSelector) -> None:
        client = self._clients.pop(token, None)
        if client is not None:
            client.remains.abandoned(selector)

    def _compact(self) -> None:
        with self._lock:  # (attach adds clients)
            clients = list(self._clients.items())
        self._heap = [(client.due, token) for token, client in clients if client.due is not None]
        heapq.heapify(self._heap)

    def _close_inherited(self) -> None:
        """(In a forked child) close the copies of the parent's loop descriptors."""
        run = self._run
        if run is not None:
            run.close()


_loop = IOLoop()


def get_loop() -> IOLoop:
    """This process's I/O loop."""
    return _loop


def on_loop_thread() -> bool:
    """True on the I/O loop's thread (where waiting for a pool's I/O would never end)."""
    return threading.current_thread() is _loop.thread()


def _new_loop_in_child() -> None:
    global _loop
    inherited, _loop = _loop, IOLoop()
    inherited._close_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_loop_in_child)
