"""A manager's default pool on each engine (`WorkerPoolManager.default_factory`;
which engines can run here is ``_platform.py``'s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._platform import resolve_engine

if TYPE_CHECKING:
    from .pool import WorkerPool

__all__ = ["build_pool", "resolve_engine"]


def build_pool(
    engine: str,
    max_size: int,
    max_pending: int | None,
    idle_timeout: float | None,
    options: dict[str, Any],
) -> WorkerPool:
    """A manager's default pool on ``engine`` (`WorkerPoolManager.default_factory`):
    a `BaseWorkerPool`, or a `LokyWorkerPool`.

    Raises:
        ImportError: the loky engine without loky installed (it names the extra).
    """
    if engine == "loky":
        from .loky import LokyWorkerPool

        return LokyWorkerPool(
            max_size, max_pending=max_pending, idle_timeout=idle_timeout, **options
        )
    from .pool import BaseWorkerPool

    return BaseWorkerPool(max_size, max_pending=max_pending, idle_timeout=idle_timeout, **options)
