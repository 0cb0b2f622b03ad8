"""Progress bars for maps and futures, drawn by tqdm (the extra ``pool-manager[progress]``).

``pool.map(fn, items, progress=True)`` draws a bar that advances as `map`
hands results out (in order: the bar says "in input order"; an unordered
map's bar counts them as they finish), described by the pool's name (a
manager names each pool after its key). `as_completed` is
``concurrent.futures.as_completed`` with the same option. ``progress`` is
True, the bar's description, or a dict of tqdm's keyword arguments
(`ProgressOption`). Without tqdm installed, asking for progress raises
``ModuleNotFoundError`` naming the extra; without asking, tqdm is never
imported.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Protocol, TypeAlias, TypeVar

from .errors import ResultTimeoutError

__all__ = [
    "IN_INPUT_ORDER",
    "PROGRESS_EXTRA",
    "ProgressBar",
    "ProgressOption",
    "as_completed",
    "asks_for_a_bar",
    "progress_bar",
    "with_progress",
]

T = TypeVar("T")

#: What to install for progress bars.
PROGRESS_EXTRA = "pool-manager[progress]"

#: What ``progress=`` takes: False (no bar), True (a bar described by the
#: pool's name), the bar's description, or tqdm's keyword arguments for the
#: bar (``{"desc": "tenant-a", "leave": False, "position": 1}``; they win
#: over what the library sets: ``total``, ``desc``, ``unit``, ``postfix``).
ProgressOption: TypeAlias = bool | str | Mapping[str, Any]

#: The postfix of an in-order map's bar: it counts results as they are handed
#: out in input order, so a slow first call holds it back.
IN_INPUT_ORDER = "in input order"


class ProgressBar(Protocol):
    """What this package uses of a ``tqdm`` bar."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


def asks_for_a_bar(progress: ProgressOption) -> bool:
    """Does ``progress`` ask for a bar? (A dict does, even an empty one.)

    Raises:
        TypeError: ``progress`` is none of a bool, a str or a mapping.
    """
    if isinstance(progress, Mapping):
        return True
    if not isinstance(progress, (bool, str)):
        raise TypeError(
            "progress must be True or False, the bar's description (a str), or a dict "
            f"of tqdm keyword arguments, not {type(progress).__name__}"
        )
    return bool(progress)


def progress_bar(
    total: int | None, description: str | None, unit: str, **options: Any
) -> ProgressBar:
    """A new tqdm bar (``tqdm.auto``: a widget in a notebook, text elsewhere).

    ``options`` are more of tqdm's keyword arguments (they win over the others).

    Raises:
        ModuleNotFoundError: tqdm is not installed (the message names the extra).
        Exception: what tqdm raises for options it does not take.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ModuleNotFoundError(
            f"progress bars need tqdm: pip install '{PROGRESS_EXTRA}' (or pip install tqdm)",
            name="tqdm",
        ) from error
    bar: ProgressBar = tqdm(**{"total": total, "desc": description, "unit": unit, **options})
    return bar


def with_progress(
    start: Callable[[], Iterator[T]],
    progress: ProgressOption,
    name: str | None,
    total: int | None,
    unit: str,
    *,
    in_input_order: bool = False,
) -> Iterator[T]:
    """``start()``'s items, counted on a new bar (made first: a missing tqdm sends nothing).

    ``progress`` is True, the bar's description (``name`` otherwise), or
    tqdm's keyword arguments. ``in_input_order``: the items come in input
    order, and the bar says so (its postfix, `IN_INPUT_ORDER`, unless
    ``progress`` sets one). The bar is closed when the iteration ends,
    however it ends, or if ``start`` raises.
    """
    options: dict[str, Any] = {"postfix": IN_INPUT_ORDER} if in_input_order else {}
    if isinstance(progress, Mapping):
        options.update(progress)
    bar = progress_bar(total, progress if isinstance(progress, str) else name, unit, **options)
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
    progress: ProgressOption = False,
    total: int | None = None,
) -> Iterator[Future[T]]:
    """``concurrent.futures.as_completed``, with a progress bar if ``progress``.

    ``progress`` is True, the bar's description, or a dict of tqdm's
    keyword arguments (`ProgressOption`). The bar counts the
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
    if not asks_for_a_bar(progress):
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
