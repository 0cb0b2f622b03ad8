"""The loky pool's parts (``loky.py`` is the pool): what runs in a loky worker,
the records the pool keeps (`_LokyTaskFuture`, `_Slot`, `_Actions`), its errors
and the checks of its arguments.

In a worker, a slot's executor runs `_start_slot` as its initializer (the
watchdog thread, then the native thread pools' limit, then the pool's
shared data, ``_loky_shared.load``, then the pool's initializer; it keeps
the failure of either),
`_probe` as its first task, and each task through `_run`, which answers
with the worker's pid. They travel by reference: a loky worker imports
this module (and loky) to run them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
from loky.process_executor import TerminatedWorkerError

from . import _loky_shared, _shared, _threads
from ._durations import to_count
from ._native_threads import ThreadLimit, limit_loaded
from ._queued import QueuedPool, _QueuedFuture
from ._worker import _watch_parent, worker_env
from .errors import (
    ArgumentUnpicklingError,
    ResultUnpicklingError,
    WorkerLostError,
    WorkerPoolBrokenError,
)

#: Tasks a slot holds at once: one running, one waiting in loky's call queue.
HANDED_PER_SLOT = 2

#: loky's start methods that work on every platform; "fork" and
#: "forkserver" are refused (see `LokyWorkerPool`).
START_METHODS = ("loky", "loky_init_main", "spawn")

# -- in the loky worker ------------------------------------------------------------

#: (In a worker) the traceback of the pool's initializer, if it raised there
#: (or of loading the pool's shared data, after `SHARED_DATA_FAILED`).
_init_failure: str | None = None
#: How a failure to load the shared data starts (`_not_ready` words it so).
SHARED_DATA_FAILED = "loading the pool's shared_data failed:\n"


def _start_slot(
    parent_pid: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    shared: _loky_shared.LokySharedSpec | None = None,
    threads: tuple[int, dict[str, str]] | None = None,
) -> None:
    """(In a loky worker, as its executor's initializer) start the watchdog, set
    the native thread pools' variables and limit those loaded (``threads``:
    the count and the variables, `slot_env`), load the pool's shared data
    (``shared``), then run the pool's initializer; what either raises is
    kept for the probe (and the initializer does not run if the shared data
    failed to load)."""
    global _init_failure
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="pool_manager-watchdog", daemon=True
    ).start()
    if hasattr(signal, "pthread_sigmask"):
        # The slot was started from a pool_manager thread, which blocks these
        # (its children inherit the mask): the worker takes them as any would.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _shared.mark_worker()  # (`shared_data()` here: "this worker's pool has none")
    if threads is not None:
        # (Set at its start already but with "spawn", which loky gives no env.)
        os.environ.update(threads[1])
        limit_loaded(threads[0])
    if shared is not None:
        try:
            _loky_shared.load(shared)
        except BaseException:
            _init_failure = SHARED_DATA_FAILED + traceback.format_exc()
            return
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            _init_failure = traceback.format_exc()


def slot_env(
    env: dict[str, str] | None, threads: ThreadLimit | None, context: str
) -> tuple[dict[str, str] | None, tuple[int, dict[str, str]] | None]:
    """(In the parent, as a slot starts) the ``env`` for its loky executor (the
    pool's, with the native thread pools' variables: loky sets them as the
    worker's interpreter starts), and the ``threads`` for `_start_slot`."""
    if threads is None:
        return env, None
    variables = threads.loky_env(env)
    if context.startswith("loky"):  # (loky passes an env to these start methods only)
        env = {**(env or {}), **variables}
    return env, (threads.count, variables)


def _probe() -> tuple[int, str | None]:
    """(In a worker: a slot's first task) its pid, and its initializer's failure if any."""
    return os.getpid(), _init_failure


def _run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """(In a worker) one task: ``(pid, seconds, fn(*args, **kwargs))``, so that the
    pool knows the worker's pid even if loky replaced it (loky restarts a
    worker whose memory grew by 300 MB), and how long the task ran."""
    if _init_failure is not None:
        raise RuntimeError(f"the pool's initializer failed in this worker:\n{_init_failure}")
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return os.getpid(), time.perf_counter() - started, value


# -- in the parent -------------------------------------------------------------------

_on_slot_thread = threading.local()  # .active: settling an answer, on a loky manager thread


def _on_a_slot_thread() -> bool:
    """True on a loky manager thread, where an answer is being settled: waiting
    there for a slot to shut down would wait for the thread itself."""
    return bool(getattr(_on_slot_thread, "active", False))


@contextlib.contextmanager
def _settling_here() -> Iterator[None]:
    """Around an answer from loky (on its manager thread, or at once on this one)."""
    before = _on_a_slot_thread()
    _on_slot_thread.active = True
    try:
        # (A submit from a done-callback is never held; only for the block: an
        # answer already there is settled at once, on the caller's thread.)
        with _threads.as_library_thread():
            yield
    finally:
        _on_slot_thread.active = before


class _LokyTaskFuture(_QueuedFuture):
    """The future `LokyWorkerPool.submit` returns.

    Until it is handed to a slot it waits in the pool's queue and can be
    cancelled; once handed it is *running* (as a ``ProcessPoolExecutor``
    task in its call queue), and stays so if its slot breaks before
    starting it and it goes back to the queue. Its done-callbacks run on
    the thread that settles it: usually its slot's loky manager thread.
    """

    def __init__(
        self,
        pool: QueuedPool[Any],
        call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    ) -> None:
        super().__init__(pool)
        #: What to send; kept until it settles (a broken slot's next task is sent again).
        self._call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = call
        self._sent_at = 0.0
        #: Seconds it may run (``task_timeout``, `submit_with_timeout`), or None.
        self.timeout: float | None = None
        #: When it runs past ``timeout`` (``time.monotonic()``): set as it is
        #: handed to a slot with nothing else to run, so it starts at once.
        self._deadline: float | None = None
        #: Seconds from handing the task to a slot to its answer, once answered.
        self.run_time: float | None = None
        #: What kind of task it is (`_dispatch.task_kind`: how long it may run).
        self.kind: object = None

    def _let_go(self) -> None:
        self._call = None


class _Slot:
    """One loky worker: a one-worker ``ProcessPoolExecutor``, and what it holds.

    Its fields change under the pool's ``_lock``; ``sending`` is held by the
    one thread that submits to its executor, so that loky gets the tasks in
    the order they were handed (which is how a crash's culprit is known).
    """

    __slots__ = (
        "closed",
        "executor",
        "handed",
        "holds_place",
        "idle_since",
        "pid",
        "place_since",
        "ready",
        "retiring",
        "sending",
        "taken",
        "unsent",
    )

    def __init__(self) -> None:
        self.executor: Any = None  # a loky.ProcessPoolExecutor, once started
        self.pid: int | None = None  # its worker's, from the probe and each answer
        self.ready = False  # its probe answered: it takes tasks
        self.retiring = False  # takes no more tasks; shut down once it holds none
        self.closed = False  # out of the pool (being shut down, or to be once started)
        self.handed: deque[_LokyTaskFuture] = deque()  # sent or to send, unanswered, in order
        self.unsent: deque[_LokyTaskFuture] = deque()  # handed, not yet submitted to loky
        self.taken = 0  # tasks handed to it in all (``max_tasks_per_worker``)
        self.sending = threading.Lock()
        # Under ``max_busy_workers`` (`budget.PlaceHolder`): it holds a place, since when.
        self.holds_place = False
        self.place_since = 0.0
        #: ``time.monotonic()`` it went idle (ready, holding no task), under an
        #: ``idle_timeout``; None while busy or starting.
        self.idle_since: float | None = None

    @property
    def assigned(self) -> deque[_LokyTaskFuture]:
        """(`budget.PlaceHolder`) the tasks in its hands: ``handed``."""
        return self.handed


class _SlotState:
    """A slot as `ProcessView` reads a worker (``_processes``)."""

    __slots__ = ("_slot", "pid", "status")

    def __init__(self, pid: int, slot: _Slot) -> None:
        self.pid = pid
        self.status: int | None = None
        self._slot = slot

    @property
    def ended(self) -> bool:
        return self._slot.closed


class _Actions:
    """What a decision under the pool's lock leaves to do once it is released."""

    __slots__ = ("closes", "feeds", "finished", "idle_callbacks", "starts", "watch", "went_idle")

    def __init__(self) -> None:
        self.watch = False  # a deadline or a memory limit to watch (`_loky_watch`)
        self.went_idle = False  # its last unfinished task finished (for the budget)
        self.starts: list[_Slot] = []
        self.feeds: list[_Slot] = []
        self.closes: list[tuple[_Slot, bool]] = []  # (slot, kill its worker)
        self.finished: list[tuple[_LokyTaskFuture, bool | None, Any]] = []  # counted; to settle
        self.idle_callbacks: list[Callable[[], object]] = []


def _lost(error: BaseException, pid: int | None) -> WorkerLostError:
    """loky's error for a task its slot's breakage took, as this package's `WorkerLostError`."""
    worker = f"loky worker process {pid}" if pid is not None else "the loky worker process"
    if isinstance(error, TerminatedWorkerError):
        what = f"{worker} died while running this task; the pool replaced it"
    else:  # (the task before it would not load, there or here: loky ended the worker)
        what = (
            f"loky ended {worker} after the task before this one failed ({error}); this "
            "one may have started"
        )
    lost = WorkerLostError(
        f"{what}, and its other tasks are unaffected (loky's error, the cause, says more)",
        pid=pid,
    )
    lost.__cause__ = error
    return lost


def _poisoned(error: BaseException) -> BaseException:
    """loky's error for a task whose call or result would not load (it ends the
    worker then), as the fork server's pools say it: `ArgumentUnpicklingError`
    or `ResultUnpicklingError`, caused by loky's (which holds the traceback).
    Any other error is returned as it is."""
    message = str(error)
    if message.startswith("A task has failed to un-serialize"):
        poisoned: BaseException = ArgumentUnpicklingError(
            "the task's function or arguments failed to unpickle in the loky worker "
            "(loky's error, the cause, has the worker's traceback); only this task failed"
        )
    elif message.startswith("A result has failed to un-serialize"):
        poisoned = ResultUnpicklingError(
            "the task ran, but its result failed to unpickle here (loky's error, the "
            "cause, has the traceback); only this task failed"
        )
    else:
        return error
    poisoned.__cause__ = error
    return poisoned


def _not_ready(count: int, error: BaseException | None, failure: str | None) -> BaseException:
    """The error for queued tasks once ``count`` slots in a row failed to get ready."""
    if failure is not None:
        what = "the pool's initializer"
        if failure.startswith(SHARED_DATA_FAILED):
            what, failure = "loading the pool's shared_data", failure[len(SHARED_DATA_FAILED) :]
        return WorkerPoolBrokenError(
            f"{what} failed in {count} loky worker processes in a row; the task was not "
            f"run. The last failure, in the worker:\n{failure}"
        )
    broken = WorkerPoolBrokenError(
        f"{count} loky worker processes in a row ended before they were ready (killed as "
        "they started, or ended by their initializer); the task was not run"
    )
    broken.__cause__ = error
    return broken


def _check_options(
    max_pending: int | None,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    context: str,
    env: dict[str, str] | None,
) -> None:
    """Check a loky pool's arguments (raises ``TypeError``/``ValueError``)."""
    if max_pending is not None:
        to_count("max_pending", max_pending, minimum=0)
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be callable")
    if not isinstance(initargs, tuple):
        raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
    if not isinstance(context, str):
        raise TypeError(f"context must be a start method's name, not {type(context).__name__}")
    if context not in START_METHODS:
        raise ValueError(
            f"context must be one of {', '.join(START_METHODS)}, not {context!r} (with 'fork' "
            "or 'forkserver' a worker's parent is not this process, which its watchdog watches)"
        )
    worker_env(env)
    if env is not None and not context.startswith("loky"):
        raise ValueError(f"env needs the 'loky' or 'loky_init_main' context, not {context!r}")
    try:
        cloudpickle.dumps((initializer, initargs))
    except Exception as error:
        raise TypeError(f"the initializer and initargs must be picklable: {error}") from error
