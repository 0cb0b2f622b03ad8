"""Validation of the user-facing numbers: durations and sizes."""

from __future__ import annotations

import math
from datetime import timedelta

Duration = float | int | timedelta

#: The longest single wait the package asks of the OS, in seconds. Each kind
#: of wait has a ceiling (``epoll`` takes int milliseconds, about 24.8 days;
#: ``Condition.wait`` takes at most ``threading.TIMEOUT_MAX``, about 292
#: years): a longer duration is waited for in steps of this, so every finite
#: positive duration works.
MAX_WAIT = 86400.0


def wait_step(seconds: float | None) -> float | None:
    """``seconds`` as one OS wait: clamped to ``[0, MAX_WAIT]``; None (no limit) stays None.

    The caller waits again if its deadline has not come.
    """
    if seconds is None:
        return None
    return min(max(0.0, seconds), MAX_WAIT)


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


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def to_bytes(name: str, value: object) -> int | None:
    """Return a memory size in bytes: an int, or a string like ``"512MB"`` or ``"1.5GiB"``.

    ``None`` passes through (no limit). Decimal units (KB, MB, GB) are powers
    of 1000, binary ones (KiB, MiB, GiB) powers of 1024.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '512MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        if unit not in _UNITS or not number:
            raise ValueError(
                f"{name}: cannot read {value!r} as a size; use bytes or a unit such as "
                "'512MB' or '2GiB'"
            )
        try:
            size = int(float(number) * _UNITS[unit])
        except ValueError:
            raise ValueError(f"{name}: cannot read {value!r} as a size") from None
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a string like '512MB', not {type(value).__name__}"
        )
    if size <= 0:
        raise ValueError(f"{name} must be a positive size, got {value!r}")
    return size


def memory_limits(
    max_worker_memory: object, kill_worker_memory: object
) -> tuple[int | None, int | None]:
    """A pool's ``max_worker_memory`` and ``kill_worker_memory`` in bytes (`to_bytes`);
    the hard limit must be above the soft one."""
    soft = to_bytes("max_worker_memory", max_worker_memory)
    hard = to_bytes("kill_worker_memory", kill_worker_memory)
    if soft is not None and hard is not None and hard <= soft:
        raise ValueError(
            "kill_worker_memory must be above max_worker_memory (the soft limit "
            "replaces a worker between tasks; the hard one ends it at once)"
        )
    return soft, hard
