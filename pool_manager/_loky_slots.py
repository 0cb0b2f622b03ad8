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

A task whose function loky would pickle by value (``__main__``'s, a lambda,
a nested function: cloudpickle names its file ``<dynamic-code>``, and a
traceback loses the script's lines) travels `_Pickled` by this package's
pickler instead (`_task_call`): its code keeps its file name, and where the
worker imported the main script (the ``loky_init_main`` and ``spawn``
contexts; `_probe` reports it) the main script's functions and classes go
by reference to that module, as on the fork-server engine.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, SupportsIndex

import cloudpickle
from loky.backend import context as _loky_context
from loky.process_executor import TerminatedWorkerError

from . import _loky_shared, _shared, _threads
from ._durations import to_count
from ._main_module import MP_MAIN, _report, by_reference
from ._native_threads import ThreadLimit, limit_loaded
from ._protocol import _BY_VALUE_MODULES, ByReference, MainReport, dumps
from ._queued import QueuedPool, _QueuedFuture
from ._worker import _watch_parent, check_hook, worker_env
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

#: loky's own contexts, by name. (loky's ``get_context`` reads multiprocessing's
#: registry of contexts, where joblib's copy of loky, once imported, puts its
#: own "loky" contexts in place of loky's: its workers would then start, and
#: be tracked, by joblib's copy.)
_OWN_CONTEXTS = {
    "loky": _loky_context.LokyContext(),
    "loky_init_main": _loky_context.LokyInitMainContext(),
}


def slot_context(name: str) -> Any:
    """The start method ``name`` (one of `START_METHODS`), as loky itself makes it."""
    own = _OWN_CONTEXTS.get(name)
    return own if own is not None else _loky_context.get_context(name)


# -- in the loky worker ------------------------------------------------------------

#: (In a worker) the traceback of the pool's initializer, if it raised there
#: (or of loading the pool's shared data, after `SHARED_DATA_FAILED`).
_init_failure: str | None = None
#: (In a worker) the pool's finalizer and its arguments (`_finish_slot`).
_finalizer: tuple[Callable[..., object], tuple[Any, ...]] | None = None
#: How a failure to load the shared data starts (`_not_ready` words it so).
SHARED_DATA_FAILED = "loading the pool's shared_data failed:\n"


def _start_slot(
    parent_pid: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    shared: _loky_shared.LokySharedSpec | None = None,
    index: int = 0,
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[Any, ...] = (),
    threads: tuple[int, dict[str, str]] | None = None,
) -> None:
    """(In a loky worker, as its executor's initializer) start the watchdog, set
    the native thread pools' variables and limit those loaded (``threads``:
    the count and the variables, `slot_env`), load the pool's shared data
    (``shared``), then run the pool's initializer; what either raises is
    kept for the probe (and the initializer does not run if the shared data
    failed to load). The slot's ``index`` is the worker's
    (`_shared.worker_index`); the finalizer is kept for `_finish_slot`."""
    global _init_failure, _finalizer
    _shared.set_worker_index(index)
    _finalizer = None if finalizer is None else (finalizer, finalargs)
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


def _finish_slot() -> None:
    """(In a worker: a slot's last task, as it is shut down cleanly) the pool's
    finalizer, if the worker got ready; what it raises goes to stderr."""
    if _finalizer is None or _init_failure is not None:
        return
    finalizer, finalargs = _finalizer
    try:
        finalizer(*finalargs)
    except BaseException:
        sys.stderr.write(f"pool_manager: a worker's finalizer failed:\n{traceback.format_exc()}")
        sys.stderr.flush()


#: What `_probe` answers: the worker's pid, its initializer's failure if any,
#: and the main script's module if loky imported it (`_imported_main`).
Probed = tuple[int, str | None, tuple[str, MainReport] | None]


def _probe() -> Probed:
    """(In a worker: a slot's first task) its pid, its initializer's failure if any,
    and its main module."""
    return os.getpid(), _init_failure, _imported_main()


def _imported_main() -> tuple[str, MainReport] | None:
    """(In a worker) the main script's module, if loky imported it (``loky_init_main``,
    ``spawn``): its file, and what it defines (as the fork server reports it)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or main.__name__ != MP_MAIN or not isinstance(path, str):
        return None
    return os.path.abspath(path), _report(main)


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


def _run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """(In a worker) one task: ``(pid, seconds, fn(*args, **kwargs))``, so that the
    pool knows the worker's pid even if loky replaced it (loky restarts a
    worker whose memory grew by 300 MB), and how long the task ran."""
    if _init_failure is not None:
        raise RuntimeError(f"the pool's initializer failed in this worker:\n{_init_failure}")
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return os.getpid(), time.perf_counter() - started, value


def _run_pickled(call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> Any:
    """(In a worker) `_run`, for a call that came `_Pickled` (and loaded as itself)."""
    return _run(*call)


def _load(data: bytes, *buffers: Any) -> Any:
    """(In a worker) what `_Pickled` sent."""
    return pickle.loads(data, buffers=buffers)


# -- what a slot is handed -----------------------------------------------------------


class _Pickled:
    """``obj`` as this package's pickler sends it (`_protocol.dumps`), not loky's:
    code sent by value keeps its file name, and ``main`` (a `ByReference`)
    says which of ``__main__``'s functions and classes go by reference. It
    loads as ``obj``; its large buffers are left to loky's pickle, written once."""

    __slots__ = ("main", "obj")

    def __init__(self, obj: object, main: ByReference | None = None) -> None:
        self.obj = obj
        self.main = main

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            buffers.append(buffer)
            return False

        keep = out_of_band if operator.index(protocol) >= 5 else None
        return _load, (dumps(self.obj, self.main, keep), *buffers)


def _sends_code(fn: object) -> bool:
    """Would pickling ``fn`` send its code, by value? A function, class or method of
    ``__main__``, a lambda, a nested function, a partial of one, an instance of
    ``__main__``'s class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # (a method: its function)
    if not isinstance(fn, (types.FunctionType, type)):
        fn = type(fn)  # (a callable object: its class)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "<")
    return module in (None, "__main__") or "<" in qualname or module in _BY_VALUE_MODULES


def _task_call(
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]], main: ByReference | None
) -> tuple[Any, ...]:
    """What a slot's executor is handed to run ``call``: ``_run`` and the call, or,
    where loky would send code by value (`_sends_code`), the call `_Pickled`
    (``main``: the slot's `_Slot.main`)."""
    if _sends_code(call[0]):
        return _run_pickled, _Pickled(call, main)
    return (_run, *call)


def _start_args(
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    shared: _loky_shared.LokySharedSpec | None,
    index: int = 0,
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[Any, ...] = (),
    threads: tuple[int, dict[str, str]] | None = None,
) -> tuple[Any, ...]:
    """The arguments of `_start_slot` (a slot's executor's initializer): the pool's
    initializer and finalizer `_Pickled` where they are code by value (by
    value still: the worker's main module is not known yet)."""
    sent = _Pickled(initializer) if _sends_code(initializer) else initializer
    final = _Pickled(finalizer) if _sends_code(finalizer) else finalizer
    return os.getpid(), sent, initargs, shared, index, final, finalargs, threads


def _main_refs(main: tuple[str, MainReport] | None) -> ByReference | None:
    """(In the parent) which of ``__main__``'s objects go by reference to a worker
    whose `_probe` answered ``main``: None if it imported no main module, or
    not our script (each then goes by value)."""
    ours = getattr(sys.modules.get("__main__"), "__file__", None)
    if main is None or not isinstance(ours, str) or os.path.abspath(ours) != main[0]:
        return None
    return functools.partial(_by_reference_to, main[1])


def _by_reference_to(report: MainReport, obj: object) -> bool:
    return by_reference(obj, report)  # type: ignore[arg-type]


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
        "index",
        "main",
        "pid",
        "place_since",
        "ready",
        "retiring",
        "sending",
        "taken",
        "unsent",
    )

    def __init__(self, index: int = 0) -> None:
        self.index = index  # its worker's index in the pool (`_shared.worker_index`)
        self.executor: Any = None  # a loky.ProcessPoolExecutor, once started
        self.pid: int | None = None  # its worker's, from the probe and each answer
        self.ready = False  # its probe answered: it takes tasks
        #: Which of ``__main__``'s objects go by reference to its worker (`_main_refs`).
        self.main: ByReference | None = None
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


def _setup_failure(failure: str) -> tuple[str, str]:
    """What failed in a worker (its initializer, or loading the shared data), and
    its traceback, from what `_probe` answered."""
    if failure.startswith(SHARED_DATA_FAILED):
        return "loading the pool's shared_data", failure[len(SHARED_DATA_FAILED) :]
    return "the pool's initializer", failure


def _not_ready(count: int, error: BaseException | None, failure: str | None) -> BaseException:
    """The error for queued tasks once ``count`` slots in a row failed to get ready."""
    if failure is not None:
        what, failure = _setup_failure(failure)
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
    finalizer: Callable[..., object] | None = None,
    finalargs: tuple[Any, ...] = (),
) -> None:
    """Check a loky pool's arguments (raises ``TypeError``/``ValueError``)."""
    if max_pending is not None:
        to_count("max_pending", max_pending, minimum=0)
    check_hook("initializer", initializer, initargs)
    check_hook("finalizer", finalizer, finalargs)
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
        cloudpickle.dumps((initializer, initargs, finalizer, finalargs))
    except Exception as error:
        raise TypeError(
            f"the initializer, finalizer and their arguments must be picklable: {error}"
        ) from error
