"""The native thread pools of a pool's workers (``native_threads``).

numpy's BLAS (OpenBLAS, MKL, BLIS), OpenMP and their kin start as many
threads as the machine has CPUs: a pool of N workers, each running such
code, would run N times that many. A pool limits each worker's to its share
of the CPUs, two ways, both before the worker's initializer and tasks run:

- environment variables (`THREAD_VARIABLES`, joblib's list), which a
  library reads as it loads: the worker's environment has them before it
  imports anything of the pool's (the parent decides them as each worker
  starts: `ThreadLimit.worker_environ`, `ThreadLimit.loky_env`);
- threadpoolctl (optional: the ``threads`` extra), for the libraries loaded
  before the worker started (the fork server imports the main script's
  module, and with it numpy, with the environment it had at its start; a
  ``spawn``-started loky worker imports it before its initializer):
  `limit_loaded` sets each to what its variable says (the fork server finds
  them once: `prepare`). Without threadpoolctl the variables alone hold, for
  libraries loaded after them.

Which variables, for ``native_threads="auto"`` (a count of ``max(1, CPUs //
max_size)``): each one set in the worker's environment (the parent's current
one, the pool's ``env`` on top) stands, and so does ``OMP_NUM_THREADS``'s
word for the libraries that read it when their own variable is not set
(`FALLS_BACK_TO_OMP`): "auto" fills in only what the user left unsaid. An
int sets every variable to it but those the pool's ``env`` names.

Runs in the parent and in the workers; imports nothing of the package.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FALLS_BACK_TO_OMP",
    "THREAD_VARIABLES",
    "NativeThreads",
    "ThreadLimit",
    "limit_loaded",
    "prepare",
]

#: What ``native_threads`` takes: ``"auto"``, a count, or None (leave them alone).
NativeThreads = Literal["auto"] | int | None

#: The variables set in a worker (joblib's list, less TBB's ``ENABLE_IPC``,
#: which is not a thread count).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: The variables whose library reads ``OMP_NUM_THREADS`` when they are not set.
FALLS_BACK_TO_OMP = frozenset(
    {"OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS"}
)

#: threadpoolctl's name for each library (``internal_api``), and the variable it reads.
_VARIABLE_OF = {
    "openmp": "OMP_NUM_THREADS",
    "openblas": "OPENBLAS_NUM_THREADS",
    "mkl": "MKL_NUM_THREADS",
    "blis": "BLIS_NUM_THREADS",
}

#: How the file names of the libraries threadpoolctl controls begin (as
#: threadpoolctl matches them), each after a ``/`` as in ``/proc/self/maps``.
_LIBRARY_MARKS = tuple(
    b"/" + prefix
    for prefix in (
        b"libopenblas",
        b"libscipy_openblas",
        b"openblas",
        b"libblas",
        b"libmkl_rt",
        b"mkl_rt",
        b"libblis",
        b"libflexiblas",
        b"libgomp",
        b"libiomp",
        b"libomp",
    )
)


@dataclass(frozen=True)
class ThreadLimit:
    """A pool's ``native_threads``, resolved: each worker's thread count."""

    count: int
    #: An int was given: it overrides the parent's variables (not the pool's ``env``).
    explicit: bool

    @classmethod
    def of(cls, native_threads: object, max_size: int, cpus: int) -> ThreadLimit | None:
        """Check ``native_threads``; ``cpus``: the CPUs this process may use.

        Returns None for None (the native libraries are left alone).

        Raises:
            TypeError: not ``"auto"``, an int or None.
            ValueError: another string, or an int below 1.
        """
        if native_threads is None:
            return None
        if isinstance(native_threads, str):
            if native_threads != "auto":
                raise ValueError(
                    f"native_threads must be 'auto', an int >= 1 or None, not {native_threads!r}"
                )
            return cls(max(1, cpus // max(1, max_size)), explicit=False)
        if isinstance(native_threads, bool) or not isinstance(native_threads, int):
            raise TypeError(
                "native_threads must be 'auto', an int >= 1 or None, not "
                f"{type(native_threads).__name__}"
            )
        if native_threads < 1:
            raise ValueError(f"native_threads must be >= 1, got {native_threads}")
        return cls(native_threads, explicit=True)

    def _chosen(
        self, value_of: Callable[[str], str | None], in_env: Callable[[str], bool]
    ) -> dict[str, str]:
        """The variables to set, and their values, given a variable's value in
        the worker's environment (``value_of``: None if it is not set) and
        whether the pool's ``env`` names it (``in_env``)."""
        chosen = {}
        omp = None if self.explicit else value_of("OMP_NUM_THREADS")
        for name in THREAD_VARIABLES:
            if in_env(name) or (not self.explicit and value_of(name) is not None):
                continue
            if omp is not None and name in FALLS_BACK_TO_OMP:
                chosen[name] = omp  # (what the library would have read)
            else:
                chosen[name] = str(self.count)
        return chosen

    def worker_environ(
        self, environ: dict[bytes, bytes], env: Mapping[bytes, bytes] | None
    ) -> None:
        """(Parent, fork-server engine) set the variables in ``environ``, a worker's
        whole environment (the parent's, with the pool's ``env`` on top)."""

        pool_env = env or {}

        def value_of(name: str) -> str | None:
            value = environ.get(name.encode())
            return None if value is None else os.fsdecode(value)

        chosen = self._chosen(value_of, lambda name: name.encode() in pool_env)
        for name, value in chosen.items():
            environ[name.encode()] = os.fsencode(value)

    def loky_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """(Parent, loky engine) the variables to set in a loky worker (the pool's
        ``env`` not included), as its start goes: over this process's
        environment now, which the worker inherits, and the pool's ``env``."""
        pool_env = env or {}

        def value_of(name: str) -> str | None:
            return pool_env.get(name, os.environ.get(name))

        return self._chosen(value_of, lambda name: name in pool_env)


#: (The fork server's) threadpoolctl's view of the libraries the main module
#: loaded, made once (`prepare`): each worker forked after has it, and
#: limits them without importing threadpoolctl or scanning again.
_controller: Any = None
#: (The fork server's) `prepare` looked: ``_controller`` is all a worker
#: forked after has to limit (None: nothing, or no threadpoolctl).
_prepared = False


def prepare() -> None:
    """(The fork server, once the main module is imported) if it loaded a library
    threadpoolctl controls, import threadpoolctl and find them now, once, for
    every worker (a few milliseconds here, not in each worker's start); if
    it loaded none, the workers need not look either.

    Never raises: where threadpoolctl fails here, each worker tries itself
    (`limit_loaded`), and warns.
    """
    global _controller, _prepared
    if _prepared:
        return
    if _may_be_loaded():
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            pass
        else:
            try:
                _controller = ThreadpoolController()
            except Exception:  # (a library it cannot read)
                return
    _prepared = True


def limit_loaded(count: int) -> None:
    """(In a worker, its environment set) bring the native thread pools already
    loaded in line with the environment: each library threadpoolctl knows to
    what its variable says (`_VARIABLE_OF`), one with no variable of its own
    (FlexiBLAS) to ``count``; one whose variable is not a count (a nested
    ``OMP_NUM_THREADS="4,2"``) is left as it is.

    Does nothing when none of those libraries is loaded (one read of
    ``/proc/self/maps`` on Linux, about 0.3 ms, where importing threadpoolctl
    and its scan take about 5; nothing at all in a worker of a fork server
    that looked already, `prepare`), or threadpoolctl is not installed; in a
    worker of a fork server that found them, it costs about 0.2 ms (numpy's
    OpenBLAS). A failure of threadpoolctl is a warning (on the worker's
    stderr), not the worker's: the variables still hold for what loads later.
    """
    controller = _controller
    if controller is None:
        if _prepared or not _may_be_loaded():
            return
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
    try:
        if controller is None:
            controller = ThreadpoolController()
        wanted: dict[int, list[str]] = {}
        for library in controller.info():
            variable = _VARIABLE_OF.get(library["internal_api"])
            number = count if variable is None else _count(os.environ.get(variable, ""))
            if number is not None and library["num_threads"] != number:
                wanted.setdefault(number, []).append(library["filepath"])
        for number, paths in wanted.items():
            controller.select(filepath=paths).limit(limits=number)
    except Exception as error:  # (a library threadpoolctl cannot drive: not the worker's end)
        warnings.warn(
            f"pool_manager: threadpoolctl could not limit the native thread pools "
            f"loaded in this worker: {error!r}",
            RuntimeWarning,
            stacklevel=1,
        )


def _count(value: str) -> int | None:
    """A variable's value as a thread count (None if it is none)."""
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 1 else None


def _may_be_loaded() -> bool:
    """Whether a library threadpoolctl controls may be loaded in this process
    (True where it cannot be known cheaply: no ``/proc``)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            text = maps.read()
    except OSError:
        return True
    return any(mark in text for mark in _LIBRARY_MARKS)
