"""Task functions and test doubles shared by the tests.

Task functions live in this importable module so that workers load them by
reference, as user code in a package would be.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def getpid() -> int:
    return os.getpid()


def wait_for_path(path: str, timeout: float = 60.0) -> str:
    """Block in the worker until ``path`` exists (a cross-process gate)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return path


def touch_and_wait(started: str, gate: str, timeout: float = 60.0) -> int:
    """Mark ``started`` (a file), then wait for ``gate``; returns the worker's pid."""
    Path(started).touch()
    wait_for_path(gate, timeout)
    return os.getpid()


def wait_then_square(gate: str, x: int, timeout: float = 60.0) -> int:
    """Wait for ``gate`` (a file), then return ``x * x``."""
    wait_for_path(gate, timeout)
    return x * x


def wait_for_count(directory: str, name: str, count: int, timeout: float = 60.0) -> int:
    """Drop a file in ``directory`` and wait until ``count`` tasks have done so.

    It returns only if ``count`` tasks run at the same time.
    """
    Path(directory, f"{name}-{os.getpid()}-{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {count} tasks ran at once")
        time.sleep(0.005)
    return os.getpid()


def record_interval(directory: str, gate: str, timeout: float = 60.0) -> int:
    """Wait for ``gate``, then leave a file in ``directory`` named ``"<start>-<end>"``.

    The times are ``time.monotonic_ns()``, which every process on the machine
    shares, so the files show how many tasks ran at once. Returns the pid.
    """
    start = time.monotonic_ns()
    Path(directory, f"started-{start}-{os.getpid()}").touch()
    wait_for_path(gate, timeout)
    Path(directory, f"ran-{start}-{time.monotonic_ns()}").touch()
    return os.getpid()


def most_at_once(directory: str) -> int:
    """The most intervals left by `record_interval` in ``directory`` that overlap."""
    edges = []
    for name in os.listdir(directory):
        if name.startswith("ran-"):
            _, start, end = name.split("-")
            edges += [(int(start), 1), (int(end), -1)]
    running = most = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


def exit_process(code: int) -> None:
    os._exit(code)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_timeout_error(message: str) -> None:
    """A task whose own exception is a ``TimeoutError`` (not a wait's)."""
    raise TimeoutError(message)


def call_sys_exit(code: int) -> None:
    raise SystemExit(code)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def poll(predicate, timeout: float = 30.0, interval: float = 0.01):  # type: ignore[no-untyped-def]
    """Call ``predicate`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def memfds() -> int:
    """This process's open descriptors of memfd segments (large buffers, shared data)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                count += 1
        except OSError:
            pass
    return count


@contextmanager
def peak_growth(out: list[int]) -> Iterator[None]:
    """This process's peak resident growth over the block (appended to ``out``),
    sampled every 5 ms."""
    from pool_manager.memory import resident_memory

    start = resident_memory(os.getpid()) or 0
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_memory(os.getpid()) or 0)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        out.append(max(peak, resident_memory(os.getpid()) or 0) - start)


def sleep_then_square(x: int, seconds: float = 0.005) -> int:
    time.sleep(seconds)
    return x * x


def kill_self(signal_number: int) -> None:
    """Die by ``signal_number`` (the way the OOM killer or a segfault ends a worker)."""
    import signal as _signal

    if signal_number == _signal.SIGSEGV:
        import ctypes

        ctypes.string_at(0)  # a real segmentation fault
    os.kill(os.getpid(), signal_number)
    time.sleep(60)


def load_fails(message: str) -> None:
    """Called by unpickling; always raises."""
    raise RuntimeError(message)


class LoadsNowhere:
    """Pickles fine, but raises when unpickled (in whichever process loads it)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (load_fails, (self.message,))


def return_unloadable(message: str) -> LoadsNowhere:
    return LoadsNowhere(message)


def crash_initializer() -> None:
    os._exit(13)


def raise_while_exists(path: str) -> None:
    """An initializer that fails while ``path`` exists (a switch the test flips)."""
    if os.path.exists(path):
        raise ValueError(f"no model while {path} exists")


_HOARD: list[bytes] = []


def hoard(megabytes: int) -> int:
    """Keep ``megabytes`` of touched memory alive in this worker; returns its pid."""
    _HOARD.append(b"\x01" * (megabytes * 1_000_000))
    return os.getpid()


def grow_until_stopped(step_megabytes: int = 20, seconds: float = 30.0) -> None:
    """Allocate memory steadily, as a runaway task does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _HOARD.append(b"\x01" * (step_megabytes * 1_000_000))
        time.sleep(0.02)


def hold_the_gil(megabytes: int = 0) -> None:
    """Take ``megabytes`` of touched memory, then stay in one C call that holds
    the GIL (exponential regex backtracking): no thread of this process runs
    until it returns, which takes longer than any test."""
    import re

    _HOARD.append(b"\x01" * (megabytes * 1_000_000))
    re.match(r"(a+)+$", "a" * 60 + "b")


def stop_self() -> None:
    """SIGSTOP this worker: it neither runs nor answers until SIGCONT (or SIGKILL)."""
    os.kill(os.getpid(), signal.SIGSTOP)


def sleep_and_return_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def start_child_and_wait(pidfile: str, seconds: float = 300.0) -> None:
    """Start a ``sleep`` of its own (as a task runs a converter), note its pid, wait for it."""
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    Path(pidfile + ".tmp").write_text(str(child.pid))
    os.replace(pidfile + ".tmp", pidfile)
    child.wait()


def fail_at(x: int, bad: int = 0) -> int:
    """``x``, but raise ValueError for ``bad``."""
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


class UnpicklableError(Exception):
    """An exception that cannot cross to the parent."""

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("this exception cannot be pickled")


def run_step(directory: str, x: int, action: str = "ok") -> int:
    """One ``map`` call of a scripted run: mark that ``x`` ran (a file named
    ``"<x>-<pid>-<ns>"`` in ``directory``), then do ``action``: ``"ok"``
    (return ``x``), ``"sleep"`` (0.2 s, then return ``x``), ``"hang"`` (hold
    the GIL in C code for longer than any test; ``"hog"``: the same, with
    300 MB taken first), ``"raise"`` (ValueError),
    ``"unpicklable"`` (an exception that cannot be pickled), ``"lock"`` (return
    a result that cannot be pickled), ``"exit"`` (end the worker process)."""
    Path(directory, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if action == "sleep":
        time.sleep(0.2)
    elif action == "hang":
        hold_the_gil()
    elif action == "hog":
        hold_the_gil(300)  # (300 MB, then no end)
    elif action == "raise":
        raise ValueError(f"call {x} raised")
    elif action == "unpicklable":
        raise UnpicklableError(f"call {x}")
    elif action == "exit":
        os._exit(3)
    elif action == "lock":
        import threading

        return threading.Lock()  # type: ignore[return-value]  # (cannot be pickled)
    return x


def runs_per_call(directory: str) -> dict[int, int]:
    """How many times each ``x`` ran, from the marks `run_step` left."""
    counts: dict[int, int] = {}
    for name in os.listdir(directory):
        if name[0].isdigit():
            x = int(name.split("-")[0])
            counts[x] = counts.get(x, 0) + 1
    return counts


def run_scripted(directory: str, actions: tuple[str, ...], x: int) -> int:
    """`run_step` for call ``x``, with its action from ``actions``."""
    return run_step(directory, x, actions[x])


# -- large buffers (test_buffers.py) ------------------------------------------


def echo(value: object) -> object:
    return value


def add_one_and_sum(array: Any) -> float:
    """Write to the argument (a numpy array), then sum it."""
    array += 1
    return float(array.sum())


def first_item_after(array: Any, seconds: float) -> float:
    time.sleep(seconds)
    return float(array.flat[0])


def raise_with(array: Any) -> None:
    raise ValueError(f"failed with {array.shape}")


def exit_with(array: Any) -> None:
    os._exit(3)


def sleep_with(array: Any, seconds: float) -> None:
    time.sleep(seconds)


def ones(count: int) -> Any:
    import numpy

    return numpy.ones(count)


def writable_result_flags(array: Any) -> tuple[bool, float]:
    return bool(array.flags.writeable), float(array[0])


# -- shared data per pool (test_shared_data.py) -----------------------------------

#: What `remember_shared_sum`, the initializer, saw of the shared data.
_initializer_saw: float | None = None


def shared_sum(_: object = None) -> float:
    """The sum of the pool's shared data (a numpy array), read in the worker."""
    from pool_manager import shared_data

    return float(shared_data().sum())


def shared_sum_and_pid(_: object = None) -> tuple[float, int]:
    return shared_sum(), os.getpid()


def write_to_shared_data() -> None:
    from pool_manager import shared_data

    shared_data()[0] = 1.0


def shared_data_flags() -> tuple[bool, bool, int]:
    """Whether the shared array is writeable, owns its data, and the object's id."""
    from pool_manager import shared_data

    array = shared_data()
    return bool(array.flags.writeable), bool(array.flags.owndata), id(array)


def remember_shared_sum() -> None:
    """An initializer: read the whole shared array once (every page touched)."""
    global _initializer_saw
    _initializer_saw = shared_sum()


def initializer_saw() -> float | None:
    return _initializer_saw


def shared_data_lookup_error() -> str:
    """The message of `shared_data`'s LookupError in this worker (or "no error")."""
    from pool_manager import shared_data

    try:
        shared_data()
    except LookupError as error:
        return str(error)
    return "no error"


def shared_value() -> Any:
    from pool_manager import shared_data

    return shared_data()


def fail_to_load() -> None:
    raise RuntimeError("this shared data cannot be loaded here")


class LoadsBadly:
    """Pickles in the parent; loading it (in a worker) raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return fail_to_load, ()


def shared_buffer_info() -> tuple[str, bool, int, int]:
    """The shared data, a buffer: its type's name, read-only or not, size, first byte."""
    from pool_manager import shared_data

    view = shared_data()
    return type(view).__name__, bool(view.readonly), view.nbytes, memoryview(view)[0]


def shared_dict_summary() -> tuple[str, float, float]:
    from pool_manager import shared_data

    table = shared_data()
    return table["name"], float(table["a"].sum()), float(table["b"].sum())


# -- shared arrays (test_shared_array.py) ------------------------------------------


def sum_and_memfd_mappings(array: Any) -> tuple[float, list[str]]:
    """The argument's sum, and the names of the memfds this worker maps while it
    holds the argument (which segment the argument is a view of)."""
    total = float(array.sum())
    names = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/memfd:"):
            names.append(fields[5].split(":", 1)[1].removesuffix(" (deleted)"))
    return total, sorted(set(names))


def sum_after(array: Any, seconds: float) -> float:
    time.sleep(seconds)
    return float(array.sum())


def numpy_imported_pid(seconds: float) -> int:
    """Import numpy in this worker (as loading an array argument does), wait, return the pid."""
    import numpy  # noqa: F401

    time.sleep(seconds)
    return os.getpid()


def learn_short(pool: Any, *calls: tuple[Any, ...]) -> None:
    """Run each ``(fn, *args)`` call to its end: a loky pool then knows their kinds
    as short, and lets a second task wait in a slot behind a running one."""
    for fn, *args in calls:
        pool.submit(fn, *args).result(timeout=60)
