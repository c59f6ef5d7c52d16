"""``drctl status`` shows only what is current about the prober.

After a restart with ``--no-prober`` the last run's status file is still in the state folder; status
used to print its pid, ticks, zone verdicts and failures as if the prober were running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.cli.status import PROBER_STALE_AFTER, detector_lines, read_prober
from drctl.settings import StateLayout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dr-policy.yaml"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _write_status(layout: StateLayout, pid: int, updated_at: datetime) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    status = {
        "pid": pid,
        "updated_at": updated_at.isoformat(),
        "ticks": 4242,
        "unreported": ["llama-2-7b-0"],
        "zones": {"az-1": "down", "az-2": "up"},
    }
    layout.prober_status_file.write_text(json.dumps(status))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeping_prober() -> Iterator[int]:
    """A live process whose command line names the prober's module (it sleeps; it writes nothing)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "drctl.detectors.prober"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _text(lines: list[object]) -> str:
    return "\n".join(str(line) for line in lines)


def test_a_prober_that_is_gone_shows_nothing_of_its_last_run(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    pid = _dead_pid()
    _write_status(layout, pid, NOW)
    text = _text(detector_lines(layout, NOW))
    assert "prober: not running" in text
    assert str(pid) not in text and "4242" not in text
    assert "zones" not in text and "az-1" not in text and "not reported" not in text


def test_a_live_prober_that_wrote_just_now_is_shown_with_its_verdicts(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    _write_status(layout, 0, NOW)
    view = read_prober(layout.prober_status_file, NOW)
    assert view.state == "not running"  # pid 0 is no process
    _write_status(layout, os.getpid(), NOW - timedelta(seconds=1))
    text = _text(detector_lines(layout, NOW))
    assert f"prober: running (pid {os.getpid()}, 4242 ticks)" in text
    assert "1 failure(s) not reported yet" in text and "zones: az-1 down, az-2 up" in text


def test_failures_held_for_a_zone_failover_are_not_called_unreported(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    layout.root.mkdir(parents=True, exist_ok=True)
    status = {
        "pid": os.getpid(),
        "updated_at": (NOW - timedelta(seconds=1)).isoformat(),
        "ticks": 7,
        "unreported": [],
        "held_for_zone_failover": ["llama-2-7b-0", "mistral-7b-0"],
        "zones": {"az-1": "down"},
    }
    layout.prober_status_file.write_text(json.dumps(status))
    text = _text(detector_lines(layout, NOW))
    assert "2 failure(s) left to their zone's failover until it ends" in text
    assert "not reported yet" not in text


def test_a_status_file_not_written_lately_is_not_current(tmp_path: Path, sleeping_prober: int) -> None:
    layout = StateLayout(tmp_path)
    stale = NOW - PROBER_STALE_AFTER - timedelta(seconds=5)
    _write_status(layout, sleeping_prober, stale)
    view = read_prober(layout.prober_status_file, NOW)
    assert view.state == "not answering" and view.zones is None and view.unreported == 0
    assert f"pid {sleeping_prober}, last status 15s ago" == view.detail


def test_a_pid_given_to_another_process_since_is_not_the_prober(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    _write_status(layout, os.getpid(), NOW - timedelta(hours=3))  # alive, but pytest is no prober
    text = _text(detector_lines(layout, NOW))
    assert "prober: not running" in text and str(os.getpid()) not in text and "az-1" not in text


def test_cordoned_gpus_are_shown_whatever_the_prober(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.cordoned_file.write_text(json.dumps({"gpu-node-1/0": "zone az-2 failed over"}))
    assert "prober: not running (no status file); cordoned GPUs: gpu-node-1/0" in _text(detector_lines(layout, NOW))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_drctl_status_after_a_restart_without_the_prober(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    _write_status(layout, _dead_pid(), datetime.now(UTC) - timedelta(minutes=10))
    layout.instances_file.write_text(json.dumps({"instances": []}))
    env = {
        "DRCTL_TEMPORAL_ADDRESS": f"127.0.0.1:{_closed_port()}",
        "DRCTL_ENVOY_ADMIN_PORT": str(_closed_port()),
    }
    args = ["status", "--policy", str(EXAMPLE), "--state-dir", str(layout.root)]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "prober: not running (its status file is from an earlier run)" in result.output
    assert "4242" not in result.output and "az-1 down" not in result.output
    assert "drctl up: not running (no stack file)" in result.output
