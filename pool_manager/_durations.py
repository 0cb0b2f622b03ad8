"""Validation of the user-facing numbers: durations and sizes."""

from __future__ import annotations

import math
from datetime import timedelta

Duration = float | int | timedelta


def to_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Return `value` as positive seconds, or raise a `TypeError`/`ValueError`.

    `value` is an int, a float or a `datetime.timedelta`. `None` passes
    through only when `allow_none` is true (it means "never").
    """
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        kinds = "a number of seconds, a datetime.timedelta" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kinds}, not {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive duration, got {value!r}")
    return seconds


def to_count(name: str, value: object, *, minimum: int) -> int:
    """Return `value` as an int of at least `minimum`, or raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
