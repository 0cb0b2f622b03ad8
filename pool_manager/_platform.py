"""What this platform lets the library do: the one module that asks.

The fork server, the default engine (``BaseWorkerPool``), needs
``os.fork``, descriptor passing over Unix sockets (``socket.send_fds``)
and memfd segments for large buffers (``os.memfd_create``): Linux has all
three. Where one is missing (Windows has none; macOS has no memfd, and
forking a process that has threads is a known source of trouble there),
the default engine is loky (`pool_manager.loky`, a dependency on those
platforms): `WorkerPoolManager` builds every key's pool on it, and
``BaseWorkerPool`` raises `EngineUnavailableError` naming what is missing.
Importing the package never fails for lack of any of them (every other
use of a platform feature is guarded where it is made: signal masks,
``os.register_at_fork``).

Only Linux is tested; the loky engine is what runs elsewhere.
"""

from __future__ import annotations

import os
import socket

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "FORK_SERVER",
    "fork_server_missing",
    "resolve_engine",
]

#: The engines a `WorkerPoolManager` can build its pools on.
ENGINES = ("fork_server", "loky")


def fork_server_missing() -> tuple[str, ...]:
    """The features the fork server needs that this platform lacks (none on Linux)."""
    needs = (
        ("os.fork", hasattr(os, "fork")),
        ("socket.send_fds", hasattr(socket, "send_fds")),
        ("os.memfd_create", hasattr(os, "memfd_create")),
    )
    return tuple(name for name, present in needs if not present)


#: Can the fork server run here?
FORK_SERVER = not fork_server_missing()
#: The engine a `WorkerPoolManager` uses when none is named.
DEFAULT_ENGINE = "fork_server" if FORK_SERVER else "loky"


def resolve_engine(engine: str | None) -> str:
    """``engine`` checked (None: `DEFAULT_ENGINE`).

    Raises:
        TypeError, ValueError: not one of `ENGINES`.
        EngineUnavailableError: the fork server, where it cannot run.
    """
    if engine is None:
        return DEFAULT_ENGINE
    if not isinstance(engine, str):
        raise TypeError(f"engine must be one of {', '.join(ENGINES)}, not {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "fork_server":
        check_fork_server()
    return engine


def check_fork_server() -> None:
    """Raise `EngineUnavailableError` if the fork server cannot run here."""
    missing = fork_server_missing()
    if missing:
        from .errors import EngineUnavailableError

        raise EngineUnavailableError(
            f"the fork server (BaseWorkerPool, the default engine on Linux) cannot run on this "
            f"platform: it lacks {', '.join(missing)}. Use the loky engine: "
            "pool_manager.loky.LokyWorkerPool, or a WorkerPoolManager (which chooses it here)"
        )
