"""A `BaseWorkerPool`'s part that decides what of ``__main__`` travels by reference.

The workers import the main script's module (``_main_module.py``); the fork
server reports what its import defines, and a function or class of
``__main__`` that the report has travels by reference to it (by value
otherwise).
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from . import _process
from ._main_module import by_reference
from ._protocol import ByReference, MainReport

if TYPE_CHECKING:
    from collections import deque

    from ._pool_io import _Remains
    from ._pool_start import _Start

__all__ = ["_MainModuleRefs", "_MainReportNotIn"]


class _MainReportNotIn(Exception):
    """Pickling a ``__main__`` object would wait for the fork server's report of
    its import of the main module (see `BaseWorkerPool._main_by_reference_now`)."""


class _MainModuleRefs:
    """The mixin: a pool's answers to "does this object of ``__main__`` travel by reference?"."""

    _lock: threading.Lock
    _main_importable: bool
    _remains: _Remains
    _starts: deque[_Start]
    _shut_down: bool

    def _by_reference(self) -> ByReference | None:
        return self._main_by_reference if self._main_importable else None

    def _main_by_reference(self, obj: object) -> bool:
        """(No lock held) The workers have this function or class of ``__main__``:
        it travels by reference. The first asks the fork server what its import
        of the main module defines, and may wait for the server to boot."""
        report = self._main_report()
        return report is not None and by_reference(obj, report)  # type: ignore[arg-type]

    def _main_by_reference_now(self, obj: object) -> bool:
        """`_main_by_reference`, for a submit that must not wait (`_submit_nowait`,
        on an event loop's thread): raises `_MainReportNotIn` if it would."""
        server = self._remains.server
        if server is None or server.gone or not server.ready:
            raise _MainReportNotIn
        return self._main_by_reference(obj)

    def _main_report(self) -> MainReport | None:
        """(No lock held) What the main module in this pool's workers defines:
        the fork server's report (the pool takes its hold on the server now,
        if it has none). None: no main module (a server that fails to start
        fails the pool's worker starts on its own)."""
        server = self._remains.server
        if server is not None and not server.gone:
            try:
                return server.main_report()
            except Exception:  # (it failed to start: its worker starts say why)
                return None
        try:
            server = _process.acquire_server()
        except (OSError, RuntimeError):
            return None
        report = None
        with contextlib.suppress(Exception):
            report = server.main_report()
        with self._lock:
            # (While a start is under way the starter sets the server.)
            keep = self._remains.server is None and not self._starts and not self._shut_down
            if keep:
                self._remains.server = server
        if not keep:
            _process.release_server()
        return report
