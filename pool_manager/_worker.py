"""Code that runs inside worker processes.

Kept tiny and importable by reference, so that a task ships as
``(helper, fn, args)`` and only ``fn`` and its arguments are pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def call_with_kwargs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``fn(*args, **kwargs)``; lets a task take keywords named ``fn`` or ``self``."""
    return fn(*args, **kwargs)


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn`` over one chunk of ``map`` arguments, in order."""
    return [fn(*args) for args in chunk]
