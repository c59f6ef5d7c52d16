"""Memory sizes as written in policy files: ``16Gi``, ``4MiB``, ``512M``, or a number of bytes.

Parsing is memoised per string (a policy of many models repeats ``gpuMemory: 16Gi``), and sizes
are capped at :data:`MAX_SIZE` so a typo of many digits is an error, not an overflow.
"""

from __future__ import annotations

import re
from functools import lru_cache

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
MAX_SIZE = 1 << 60
"""An exbibyte: more than any GPU, node or tenant has."""


def parse_size(value: object) -> int:
    """Return a size in bytes from ``16Gi``, ``4MiB``, ``80GB`` or a plain integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '16Gi' or '4MiB', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _capped(value, value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as '16Gi' or '4MiB', got {type(value).__name__}")
    return _parse_text(value)


@lru_cache(maxsize=4096)
def _parse_text(value: str) -> int:
    match = _SIZE.fullmatch(value) if len(value) <= 64 else None
    if not match or match.group(2).lower() not in _UNITS:
        shown = repr(value) if len(value) <= 64 else f"{value[:64]!r}…"
        raise ValueError(f"{shown} is not a size; write e.g. '16Gi', '80GB', '4MiB' or a number of bytes")
    return _capped(float(match.group(1)) * _UNITS[match.group(2).lower()], value)


def _capped(size: float, written: object) -> int:
    if size > MAX_SIZE:
        shown = repr(written)
        shown = shown if len(shown) <= 64 else shown[:63] + "…"
        raise ValueError(f"{shown} is larger than any size drctl accepts (1 EiB)")
    return int(size)


def format_size(num_bytes: int) -> str:
    """Render bytes with a binary unit, e.g. ``4MiB``."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    raise AssertionError("unreachable")
