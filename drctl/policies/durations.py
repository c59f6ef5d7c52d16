"""Duration strings as platform teams write them in policy files: ``10s``, ``1m``, ``5m``, ``0``.

Parsing is memoised per string: a policy of many models repeats the same few durations (``rto: 30s``
on every model), and parsing was most of the schema's time on such files. Values that ``timedelta``
cannot hold (more than 999,999,999 days, NaN, infinity) are errors, not crashes.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from functools import lru_cache

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(\.\d+)?")
_EXAMPLES = "write e.g. '10s', '1m', '5m', '1h30m' or '500ms'"
_MAX_SECONDS = timedelta.max.total_seconds()


def parse_duration(value: object) -> timedelta:
    """Parse ``1h30m``, ``10s``, ``500ms``, a bare number of seconds, or a timedelta.

    A bare ``0`` is accepted because the seed writes ``rpo: 0``. Fields where zero makes no sense
    also check :func:`require_positive`.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '10s', '1m' or '500ms', got a boolean")
    if isinstance(value, int | float):
        return _seconds(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '10s', '1m' or '500ms', got {type(value).__name__}")
    return _parse_text(value)


@lru_cache(maxsize=4096)
def _parse_text(value: str) -> timedelta:
    text = value.strip().lower()
    if len(text) > 64:
        raise ValueError(f"{value[:64]!r}… is not a duration; {_EXAMPLES}")
    if _NUMBER.fullmatch(text):
        return _seconds(float(text), value)
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration; {_EXAMPLES}")
    return _seconds(total, value)


def _seconds(seconds: float, written: object) -> timedelta:
    if math.isnan(seconds):
        raise ValueError("a duration cannot be NaN")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds >= _MAX_SECONDS:
        raise ValueError(f"{written!r} is longer than any duration can be (999,999,999 days)")
    return timedelta(seconds=seconds)


def require_positive(value: timedelta) -> timedelta:
    """For durations where zero makes no sense (an interval, a timeout, a window): more than 0."""
    if value <= timedelta(0):
        raise ValueError(f"must be more than 0 (got {format_duration(value)})")
    return value


def format_duration(value: timedelta) -> str:
    """Render a duration the way a person would write it in a policy file."""
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
