"""Worker processes: how they start (a fork server), and the parent's handle on it.

Starting: a fork server
    Every worker is forked from a *fork server*: one small Python process per
    parent process, started with ``subprocess`` when the first pool (or
    manager) needs it. It imports this package and cloudpickle, and of the
    application's only its main module (below), and it has a single thread
    (unless that module's top level starts one), so forking it is safe
    where forking the parent (threads holding locks) is not. A fork costs a
    few milliseconds, not the tens of a fresh interpreter, and the workers
    share the server's memory pages until they write to them.

    The server holds, for each worker, the write end of a *status pipe*: when
    it has reaped the worker, it writes the worker's exit status there (as
    ``Popen.returncode`` words it: negative for a signal) and closes it. The
    pool reads it to learn that, and how, a worker ended. When the parent
    goes away (its end of the control socket closes) the server kills its
    workers and exits.

    The server runs with the parent's interpreter flags (``-O``, ``-W``,
    ``-X``, ``-s``, ``-I``...), gets the parent's ``sys.path`` as arguments
    (each entry as ``os.fspath`` gives it), and starts with no signal blocked, whatever the
    thread that started it had blocked. Until it is ready, what it prints
    goes to a pipe the parent reads, so that a server that dies at boot
    raises `ForkServerError` with its traceback; then its stderr (and so
    its workers') is the parent's.

    The main module
    When the parent's main module is importable (a script, ``python -m
    pkg.mod``: see ``_main_module.py``), the server imports it once, as
    ``__mp_main__``, after it says it is ready and before it forks: every
    worker has it. Then it reports what the module defines (a
    `MainReport`), which the parent reads with the ready byte
    (`ForkServer.main_report`): it tells which of ``__main__``'s objects
    travel by reference. A script's unguarded top level runs there, once
    per server. An import that fails (or ends the server, or hangs past
    ``MAIN_IMPORT_TIMEOUT``) leaves the workers without a main module:
    the parent warns once, and no later server of the process imports it.
    A pool started while the server imports the module (the script's
    unguarded top level starts one) raises ``RuntimeError`` there.

The wire
    What crosses between the parent, the server and the workers (the
    control socket, the status pipes, one Unix stream socket per worker:
    frames, message kinds, reason codes, exit statuses, the task envelope)
    is ``_protocol.py``'s. What runs in a worker is ``_worker.py``'s: the
    server imports it (in `serve`), so that every worker has it from the
    start, and it imports nothing from here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from ._protocol import (
    FORK_REQUEST,
    MAIN_REPORT,
    SERVER_READY,
    STATUS,
    UNREACHABLE_EXIT_CODE,
    WORKER_PID,
    MainReport,
    MainToImport,
)

__all__ = [
    "ForkServer",
    "ForkServerGone",
    "acquire_server",
    "check_not_importing_main",
    "acquire_ready_server",
    "cpu_count",
    "kill_worker",
    "release_server",
    "signals_blocked",
]


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, and its cgroup's CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, int(quota + 0.999)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, or v1 CFS quota), if limited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as cpu_max:
            quota, period = cpu_max.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as quota_file:
            quota_us = int(quota_file.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as period_file:
            period_us = int(period_file.read())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


#: Signals left to the main thread: our threads start with them blocked.
MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread for the block (threads started inherit it).

    A signal delivered to a helper thread runs its Python handler on the main
    thread, but does not wake the main thread from a blocking call: so our
    threads never take them.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- the fork server, parent side -------------------------------------------------


class ForkServerGone(OSError):
    """The fork server exited (or was killed): start a new one."""


#: The server's ``-c`` code. Its ``sys.path`` comes as arguments (strings,
#: so no entry's repr has to be valid Python), which it takes off
#: ``sys.argv``; the main module to import (a `MainToImport` as a tuple of
#: strings, or None) as a Python literal.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[1:]; del sys.argv[1:]; "
    "from pool_manager._process import serve; serve({control}, {stderr}, {main})"
)

#: Seconds a fork server may take to boot before it is killed (and
#: `ForkServerError` raised): an interpreter start and a few imports, about
#: 50 ms on an idle machine.
SERVER_BOOT_TIMEOUT = 60.0
#: Seconds the server may take to import the main module (its top level
#: runs) once it has booted; past that it is killed, and the workers of the
#: process's next servers have no main module.
MAIN_IMPORT_TIMEOUT = 300.0
#: The most of a server's boot output kept (its last bytes) for the error.
_BOOT_OUTPUT_LIMIT = 1 << 16


def _server_path(path: Iterable[object]) -> list[str]:
    """``sys.path`` as strings for the server's arguments: ``os.fspath`` of each entry.

    Entries that are not paths (or cannot be passed as an argument: a NUL
    character, or no encoding for the file system) are left out, as the
    import system ignores what it cannot use.
    """
    entries = []
    for entry in path:
        try:
            text = os.fsdecode(entry)  # type: ignore[arg-type]  # (TypeError: not a path)
            os.fsencode(text)
        except (TypeError, UnicodeError):
            continue
        if "\0" not in text:
            entries.append(text)
    return entries


def _interpreter_flags() -> list[str]:
    """This interpreter's flags (``-O``, ``-W``, ``-X``, ``-s``, ``-I``...), for the server.

    Workers run with the parent's semantics, as multiprocessing's spawned
    children do (the same function makes their command line).
    """
    return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]


class ForkServer:
    """A handle on the fork server process (see the module docstring).

    `start_worker` may be called from any thread; each call takes a few
    milliseconds (the server forks and answers with the pid).

    Raises:
        OSError: the server process could not be started (out of file
            descriptors or processes, say).
    """

    def __init__(self) -> None:
        main: MainToImport | None = None
        if not _main_import_failed:
            from ._main_module import alias_main, main_to_import

            main = main_to_import()
            if main is not None:
                alias_main()
        ours, theirs = socket.socketpair()
        self._lock = threading.Lock()
        self._control = ours
        stderr = -1  # the parent's stderr, for the server once it has booted
        try:
            try:
                stderr = os.dup(2)
            except OSError as error:
                if error.errno != errno.EBADF:
                    raise  # (no stderr at all: the server writes to /dev/null)
            code = _BOOT.format(
                control=theirs.fileno(),
                stderr=stderr,
                main=None if main is None else repr(tuple(main)),
            )
            with signals_blocked():
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        *_interpreter_flags(),
                        "-c",
                        code,
                        *_server_path(sys.path),
                    ],
                    pass_fds=(theirs.fileno(),) if stderr < 0 else (theirs.fileno(), stderr),
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if stderr >= 0:
                os.close(stderr)
        self.pid = self._process.pid
        self.gone = False
        self._ready = False  # its READY byte and its main report have been read
        self._imports_main = main is not None
        self._main_report: MainReport | None = None  # (when it imported the main module)

    def wait_ready(self) -> None:
        """Wait until the server has booted (its imports done) and can fork at once.

        Raises:
            ForkServerError: it exited before it was ready, or did not get
                ready within ``SERVER_BOOT_TIMEOUT`` seconds (then it is
                killed); the message holds what it printed.
            ForkServerGone: it had already exited, or it exited (or hung)
                as it imported the main module.
        """
        with self._lock:
            self._await_ready()

    @property
    def ready(self) -> bool:
        """It has booted, and imported the main module if asked (`main_report`
        would not wait)."""
        return self._ready

    def main_report(self) -> MainReport | None:
        """What the server's import of the main module defines (waits for it,
        as `wait_ready` does, and raises as it does); None if it imported none.
        """
        if self._ready:  # (set once the report is in: no lock to take)
            return self._main_report
        with self._lock:
            self._await_ready()
            return self._main_report

    def _await_ready(self) -> None:
        # (holds _lock) The first byte on the control socket says it is ready.
        # Until then the server's stderr is a pipe, read here as it comes (a
        # full pipe would stall its boot): on success what it printed is
        # passed on to our stderr, on failure it goes into the error.
        if self.gone:
            raise ForkServerGone("the fork server has exited")
        if self._ready:
            return
        pipe = self._process.stderr
        assert pipe is not None
        output = bytearray()
        reply = b""
        deadline = time.monotonic() + SERVER_BOOT_TIMEOUT
        poller = select.poll()  # (not select.select: our descriptors may be >= 1024)
        poller.register(self._control, select.POLLIN)
        poller.register(pipe, select.POLLIN)
        timed_out = True
        while time.monotonic() < deadline:
            events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if any(fd == self._control.fileno() for fd, _ in events):
                with contextlib.suppress(OSError):
                    reply = self._control.recv(1)
                timed_out = False
                break
            if events and not _read_some(pipe.fileno(), output):
                poller.unregister(pipe)
        if reply == SERVER_READY:
            # It switched its stderr to ours before it said so: the pipe ends here.
            os.set_blocking(pipe.fileno(), False)
            while _read_some(pipe.fileno(), output):
                pass
            pipe.close()
            _write_stderr(output)
            self._main_report = self._read_main_report()
            self._ready = True
            return
        self.gone = True
        if timed_out:
            self._process.kill()
        exitcode: int | None = None
        try:
            exitcode = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()  # (it closed its socket, but lives on)
            self._process.wait()
        os.set_blocking(pipe.fileno(), False)
        while _read_some(pipe.fileno(), output):
            pass
        pipe.close()
        text = output[-_BOOT_OUTPUT_LIMIT:].decode("utf-8", "replace").rstrip()
        if timed_out:
            what = f"did not start within {SERVER_BOOT_TIMEOUT:g}s and was killed"
        else:
            from .errors import describe_exit  # (not at the top: the server need not load it)

            what = f"exited as it started ({describe_exit(exitcode)})"
        printed = f"; it printed:\n{text}" if text else ", printing nothing"
        from .errors import ForkServerError

        raise ForkServerError(
            f"the fork server, which worker processes are forked from, {what}{printed}",
            output=text,
            exitcode=exitcode,
        )

    def _read_main_report(self) -> MainReport | None:
        # (holds _lock) What follows the ready byte: its import of the main
        # module, which may take as long as the script's top level does.
        timeout = MAIN_IMPORT_TIMEOUT if self._imports_main else SERVER_BOOT_TIMEOUT
        deadline = time.monotonic() + timeout
        header = _recv_exactly(self._control, MAIN_REPORT.size, deadline)
        length = None if header is None else MAIN_REPORT.unpack(header)[0]
        body = _recv_exactly(self._control, length, deadline) if length else b""
        if body is None or length is None:
            self._main_import_died(timed_out=time.monotonic() >= deadline)
        if not length:
            return None
        import pickle

        report: MainReport = pickle.loads(body)
        if not report.imported:
            _main_import_failed_now((report.error.strip().splitlines() or ["?"])[-1])
        return report

    def _main_import_died(self, timed_out: bool) -> NoReturn:
        # (holds _lock) The server hung, or exited, as it imported the main
        # module: the next server (which the caller starts) imports none.
        self.gone = True
        if timed_out:
            self._process.kill()
        try:
            exitcode = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            exitcode = self._process.wait()
        from .errors import describe_exit

        if timed_out:
            cause = f"it did not finish within {MAIN_IMPORT_TIMEOUT:g}s"
        else:
            cause = f"the fork server ended as it ran it ({describe_exit(exitcode)})"
        if self._imports_main:
            _main_import_failed_now(cause)
        raise ForkServerGone(f"the fork server exited as it booted ({cause})")

    def start_worker(self) -> tuple[int, socket.socket, int]:
        """Fork a worker: returns its pid, the pool's end of its socket, its status pipe.

        The worker waits for its ``INIT`` message on the socket.

        Raises:
            ForkServerGone: the server is not running any more.
            ForkServerError: the server died (or hung) as it booted.
            OSError: the fork failed (the server is fine), or we are out of
                descriptors for the worker's socket and status pipe.
        """
        ours, theirs = socket.socketpair()
        try:
            status_read, status_write = os.pipe()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            with self._lock:
                self._await_ready()
                try:
                    socket.send_fds(self._control, [FORK_REQUEST], [theirs.fileno(), status_write])
                    reply = _recv_exactly(self._control, WORKER_PID.size)
                except OSError as error:
                    self.gone = True
                    raise ForkServerGone(f"the fork server has exited: {error}") from error
                if reply is None:
                    self.gone = True
                    raise ForkServerGone("the fork server has exited")
        except BaseException:
            ours.close()
            os.close(status_read)
            raise
        finally:
            theirs.close()
            os.close(status_write)
        pid = WORKER_PID.unpack(reply)[0]
        if pid <= 0:
            ours.close()
            os.close(status_read)
            raise OSError(-pid, f"could not start a worker process: {os.strerror(-pid)}")
        os.set_blocking(status_read, False)
        return pid, ours, status_read

    def stop(self) -> None:
        """Close the control socket (the server exits) and reap the server.

        A server still booting (or importing the main module) has no worker
        and would see the socket close only once it is done: it is killed.
        """
        with self._lock:
            booting = not self._ready and not self.gone
            self.gone = True
            self._control.close()
            if self._process.stderr is not None:
                self._process.stderr.close()  # (still open if it never got ready)
        if booting:
            self._process.kill()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _read_some(fd: int, output: bytearray) -> bool:
    """Read what is in pipe ``fd`` into ``output``; False at its end (or nothing there).

    ``output`` keeps the last ``_BOOT_OUTPUT_LIMIT`` bytes; what comes before
    goes on to our stderr.
    """
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # (BlockingIOError: nothing more for now)
        return False
    output += chunk
    if len(output) > _BOOT_OUTPUT_LIMIT:
        _write_stderr(output[:-_BOOT_OUTPUT_LIMIT])
        del output[:-_BOOT_OUTPUT_LIMIT]
    return bool(chunk)


def _write_stderr(data: bytes | bytearray) -> None:
    """Pass what the fork server printed on to our stderr (where it prints once booted)."""
    with contextlib.suppress(OSError):
        written = 0
        while written < len(data):
            written += os.write(2, data[written:])


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None = None) -> bytes | None:
    """``size`` bytes from ``sock``; None at its end (or an error), or past ``deadline``."""
    data = b""
    while len(data) < size:
        if deadline is not None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return None
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            if deadline is None:
                raise
            return None
        if not chunk:
            return None
        data += chunk
    return data


# -- the main module's import -------------------------------------------------------

#: An import of the main module failed (in any server): the process's later
#: servers import none, and the parent has warned.
_main_import_failed = False
#: (The fork server) it is importing the main module: a pool may not start.
_importing_main = False


def _main_import_failed_now(cause: str) -> None:
    """No later server imports the main module; warn, once per process."""
    global _main_import_failed
    if not _main_import_failed:
        _main_import_failed = True
        from ._main_module import warn_import_failed

        warn_import_failed(cause)


def acquire_ready_server() -> None:
    """(A manager, as it is built) hold the fork server and wait until it is ready
    (about 50 ms, once per process): a new key's first worker is then a fork
    away, and no pool waits for an interpreter to boot while it holds its
    lock. Raises as the server's start does (`ForkServerError`, ``OSError``),
    holding nothing then.
    """
    server = acquire_server()
    try:
        try:
            server.wait_ready()
        except ForkServerGone:  # (it ended as it imported the main module)
            acquire_server(replace=server).wait_ready()
    except BaseException:
        release_server()
        raise


def check_not_importing_main() -> None:
    """Raise ``RuntimeError`` in a fork server importing the main module: the
    script's unguarded top level starts a pool (its workers would start a fork
    server that imports the script again, and so on).
    """
    if _importing_main:
        raise RuntimeError(
            "a pool was started while the main module was being imported in pool_manager's "
            "fork server (which imports it for the worker processes, as multiprocessing's "
            "spawn does): the script starts pools at its top level. Guard that code with "
            "`if __name__ == '__main__':`."
        )


# One fork server per process, shared by its pools and managers, and stopped
# when the last of them lets it go (so that nothing is left after shutdown).
_server_lock = threading.Lock()
_server: ForkServer | None = None
_holders = 0


#: Holds given back by finalizers (`release_server_soon`), one item each:
#: settled by the next `acquire_server` or `release_server`.
_released_soon: list[None] = []


def release_server_soon() -> None:
    """`release_server`, from a finalizer: it may run at any point of any thread
    (one that holds ``_server_lock``, say), so it takes no lock: the hold is
    given back by the next `acquire_server` or `release_server`."""
    _released_soon.append(None)  # (atomic)


def _settle_released_soon() -> None:
    """(Holds _server_lock) Count the holds given back by finalizers."""
    global _holders
    while _released_soon:
        _released_soon.pop()
        _holders -= 1


def acquire_server(replace: ForkServer | None = None) -> ForkServer:
    """Hold the process's fork server (starting it if needed); pair with `release_server`.

    ``replace``: a server found gone; a new one is started in its place
    (without taking another hold).
    """
    global _server, _holders
    check_not_importing_main()
    old = None
    with _server_lock:
        _settle_released_soon()
        if _server is None or _server.gone or _server is replace:
            old, _server = _server, ForkServer()  # (if it raises, nothing is held)
        if replace is None:
            _holders += 1
        server = _server
    if old is not None:
        old.stop()
    return server


def release_server() -> None:
    """Let go of the fork server; the last holder stops it."""
    global _server, _holders
    with _server_lock:
        _settle_released_soon()
        _holders -= 1
        if _holders > 0 or _server is None:
            return
        server, _server = _server, None
    server.stop()


def _forget_server_in_child() -> None:
    # A process forked from ours (by the application) starts its own server.
    # It closes its copy of the parent's control socket: else the server
    # would not see the parent go (or let it go) while this child lives, and
    # its workers would outlive a parent killed by SIGKILL.
    global _server, _holders, _server_lock
    inherited = _server
    _server, _holders, _server_lock = None, 0, threading.Lock()
    _released_soon.clear()
    if inherited is not None:
        inherited.gone = True
        with contextlib.suppress(OSError):
            inherited._control.close()
        pipe = inherited._process.stderr
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_server_in_child)


# -- the fork server, server side ----------------------------------------------


def serve(control_fd: int, stderr_fd: int = -1, main: tuple[Any, ...] | None = None) -> None:
    """The fork server's main loop (runs in the server process).

    ``stderr_fd``: the parent's stderr, which becomes the server's (and its
    workers') once it has booted; -1: none (``/dev/null``). ``main``: the
    main module to import (a `MainToImport`'s fields), or None.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        # Whatever the thread that started us had blocked (exec keeps the
        # mask), nothing is blocked here: a blocked SIGCHLD would hide every
        # worker's exit. The workers start with this empty mask too.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
    from . import _worker  # preloaded: every worker has it, and cloudpickle, from the start

    control = socket.socket(fileno=control_fd)
    # Booted: from here on, what the server and its workers print goes to
    # the parent's stderr, not to the pipe the parent read during the boot.
    sys.stderr.flush()
    if stderr_fd < 0:
        stderr_fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    try:
        control.sendall(SERVER_READY)
        control.sendall(_import_main(main))
    except OSError:
        os._exit(0)  # (the parent has gone, or let us go, as we booted)
    # (Set up after the import: a process the module's top level started is
    # not ours to reap.)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: dict[int, int] = {}  # pid -> the write end of its status pipe
    # poll, not select.select: the control socket has the number it had in
    # the parent, which may be 1024 or more.
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    try:
        while True:
            readable = {fd for fd, _ in poller.poll()}
            if wake_read in readable:
                with contextlib.suppress(OSError):
                    while os.read(wake_read, 512):
                        pass
                _reap(children)
            if control.fileno() in readable:
                try:
                    message, fds, _, _ = socket.recv_fds(control, 1, 2)
                except OSError:
                    break
                if not message or len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    break  # the parent has gone, or let us go
                worker_fd, status_fd = fds
                try:
                    pid = os.fork()
                except OSError as error:
                    os.close(worker_fd)
                    os.close(status_fd)
                    control.sendall(WORKER_PID.pack(-(error.errno or 1)))
                    continue
                if pid == 0:
                    try:
                        # Its own process group: what its tasks start can be
                        # ended with it (see kill_worker).
                        with contextlib.suppress(OSError):
                            os.setpgid(0, 0)
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        for fd in (wake_read, wake_write, status_fd, *children.values()):
                            os.close(fd)
                        control.close()
                        _worker.serve(socket.socket(fileno=worker_fd))
                    finally:
                        os._exit(UNREACHABLE_EXIT_CODE)
                with contextlib.suppress(OSError):
                    os.setpgid(pid, pid)  # (also here: before anyone signals the group)
                os.close(worker_fd)
                children[pid] = status_fd
                control.sendall(WORKER_PID.pack(pid))
    finally:
        for pid in children:
            kill_worker(pid)
        for pid, status_fd in list(children.items()):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    os.write(status_fd, STATUS.pack(os.waitstatus_to_exitcode(status)))
            os.close(status_fd)
    os._exit(0)


def _import_main(main: tuple[Any, ...] | None) -> bytes:
    """(The fork server) import the main module, if asked: its `MAIN_REPORT`."""
    global _importing_main
    if main is None:
        return MAIN_REPORT.pack(0)
    import pickle

    from ._main_module import import_main

    _importing_main = True
    try:
        report = import_main(MainToImport(*main))
    finally:
        _importing_main = False
        # What its top level printed is out before any fork (else each worker
        # would print its copy of the buffer again), and SIGINT is ignored
        # again (the terminal's Ctrl-C is the parent's to handle).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    body = pickle.dumps(report, pickle.HIGHEST_PROTOCOL)
    return MAIN_REPORT.pack(len(body)) + body


def _reap(children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_fd = children.pop(pid, None)
        if status_fd is not None:
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                # Killed (timeout, kill_task, terminate, memory) or failed: the
                # processes its task started go with it. A clean exit leaves
                # them, as ProcessPoolExecutor does.
                kill_worker(pid)
            with contextlib.suppress(OSError):
                os.write(status_fd, STATUS.pack(code))
            os.close(status_fd)


def kill_worker(pid: int) -> None:
    """SIGKILL worker ``pid``'s process group (the worker, and what its tasks started).

    (Each worker leads a group of its own: see the fork server.) Used by the
    fork server and by pools alike.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
