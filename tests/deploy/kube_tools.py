"""helm and kubectl for the deploy tests: the ones ``make kube-tools`` puts beside the virtual
environment's interpreter, else the PATH's; missing, a test skips with the reason, except under CI
on Linux x86-64, where the Makefile installs them and a skip would hide a broken install."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

import pytest


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} is not beside {sys.executable} nor on PATH: run scripts/install-kube-tools.sh (make kube-tools)"
    if os.environ.get("CI") and sys.platform == "linux" and platform.machine() == "x86_64":
        pytest.fail(reason)
    pytest.skip(reason)
