"""Progress bars for maps and futures, drawn by tqdm (the extra ``pool-manager[progress]``).

``pool.map(fn, items, progress=True)`` draws a bar that advances as `map`
hands results out (in order), described by the pool's name (a manager names
each pool after its key). `as_completed` is ``concurrent.futures.as_completed``
with the same option. Without tqdm installed, asking for progress raises
``ModuleNotFoundError`` naming the extra; without asking, tqdm is never
imported.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Protocol, TypeVar

from .errors import ResultTimeoutError

__all__ = ["PROGRESS_EXTRA", "ProgressBar", "as_completed", "progress_bar", "with_progress"]

T = TypeVar("T")

#: What to install for progress bars.
PROGRESS_EXTRA = "pool-manager[progress]"


class ProgressBar(Protocol):
    """What this package uses of a ``tqdm`` bar."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


def progress_bar(total: int | None, description: str | None, unit: str) -> ProgressBar:
    """A new tqdm bar (``tqdm.auto``: a widget in a notebook, text elsewhere).

    Raises:
        ModuleNotFoundError: tqdm is not installed (the message names the extra).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ModuleNotFoundError(
            f"progress bars need tqdm: pip install '{PROGRESS_EXTRA}' (or pip install tqdm)",
            name="tqdm",
        ) from error
    bar: ProgressBar = tqdm(total=total, desc=description, unit=unit)
    return bar


def with_progress(
    start: Callable[[], Iterator[T]],
    progress: bool | str,
    name: str | None,
    total: int | None,
    unit: str,
) -> Iterator[T]:
    """``start()``'s items, counted on a new bar (made first: a missing tqdm sends nothing).

    ``progress`` is True or the bar's description (``name`` otherwise). The
    bar is closed when the iteration ends, however it ends, or if
    ``start`` raises.
    """
    bar = progress_bar(total, progress if isinstance(progress, str) else name, unit)
    try:
        items = start()
    except BaseException:
        bar.close()
        raise
    return counted_items(items, bar)


def as_completed(
    futures: Iterable[Future[T]],
    timeout: float | None = None,
    *,
    progress: bool | str = False,
    total: int | None = None,
) -> Iterator[Future[T]]:
    """``concurrent.futures.as_completed``, with a progress bar if ``progress``.

    ``progress`` is True or the bar's description. The bar counts the
    futures as they are handed out; ``total`` defaults to their number. The
    bar is created at once (a missing tqdm fails here, not on iteration) and
    closed when the iteration ends, however it ends.

    Raises:
        ModuleNotFoundError: ``progress`` asked for and tqdm is not installed.
        ResultTimeoutError: (on iteration, a ``TimeoutError`` and a
            ``concurrent.futures.TimeoutError`` on every version) as
            ``concurrent.futures.as_completed`` raises its timeout.
    """
    futures = list(futures)
    if not progress:
        return _timeout_both_ways(concurrent.futures.as_completed(futures, timeout))
    return with_progress(
        lambda: _timeout_both_ways(concurrent.futures.as_completed(futures, timeout)),
        progress,
        None,
        len(futures) if total is None else total,
        "task",
    )


def _timeout_both_ways(items: Iterator[Future[T]]) -> Iterator[Future[T]]:
    """``as_completed``'s items; its timeout raised as `ResultTimeoutError`.

    (On 3.10 ``concurrent.futures.TimeoutError`` is not the builtin
    ``TimeoutError``; ``as_completed`` raises nothing else of its own.)
    """
    try:
        yield from items
    except concurrent.futures.TimeoutError as error:
        raise ResultTimeoutError(f"as_completed: {error}") from None


def counted_items(items: Iterator[T], bar: ProgressBar) -> Iterator[T]:
    """Yield ``items``, advancing ``bar`` by one for each; close it at the end."""
    try:
        for item in items:
            bar.update(1)
            yield item
    finally:
        bar.close()
