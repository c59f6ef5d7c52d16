"""Instance processes and the instance registry of the local platform, with real processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from drctl.payloads import Role
from drctl.platforms.local import processes
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance


def test_render_command_fills_placeholders_and_python() -> None:
    argv = processes.render_command(
        ["{python}", "-m", "x", "--port", "{port}", "--id={instance}"], {"port": 5, "instance": "m-0"}
    )
    assert argv == [sys.executable, "-m", "x", "--port", "5", "--id=m-0"]


def test_kill_9_is_seen_at_once_even_before_reaping(tmp_path: Path) -> None:
    pid = processes.spawn([sys.executable, "-c", "import time; time.sleep(30)", "m-7"], tmp_path / "p.log")
    assert processes.is_alive(pid)
    assert processes.runs_instance(pid, "m-7")
    assert not processes.runs_instance(pid, "m-8")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while processes.is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not processes.is_alive(pid)
    assert not processes.terminate(pid)


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(30)"
    )
    log = tmp_path / "s.log"
    pid = processes.spawn([sys.executable, "-c", stubborn], log)
    deadline = time.monotonic() + 5
    while "up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert processes.terminate(pid, grace_s=0.3)
    assert not processes.is_alive(pid)
    assert time.monotonic() - started < 3


def test_pick_port_skips_taken_ports() -> None:
    port = processes.pick_port("127.0.0.1", 23000, taken=[23000, 23001])
    assert port >= 23002


def test_registry_edits_are_persisted_atomically(tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances.json")
    assert registry.load() == {}
    with registry.edit() as instances:
        instances["m-0"] = LocalInstance(id="m-0", model="m", role=Role.SERVING, lb_priority=0)
        instances["m-1"] = LocalInstance(id="m-1", model="m", role=Role.HOT, lb_priority=1)
    updated = registry.update("m-1", role=Role.SERVING, lb_priority=0)
    assert updated.role == Role.SERVING
    reread = InstanceRegistry(tmp_path / "instances.json").of_model("m")
    assert [(i.id, i.role, i.lb_priority) for i in reread] == [("m-0", Role.SERVING, 0), ("m-1", Role.SERVING, 0)]
    assert not list(tmp_path.glob(".*.tmp"))


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def test_a_model_instance_inherits_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `drctl up` was seen to leak: every tenant's alert token in /proc/PID/environ of every
    model instance. Only the allowlist (and what the caller passes) reaches a child."""
    secrets = {
        "DRCTL_ALERT_TOKENS": '{"team-a": "aaaaaaaaaaaaaaaaaaaa"}',
        "DRCTL_ALERT_TOKENS_FILE": "/etc/drctl/tokens",
        "DRCTL_FAULT_INJECTION_TOKEN": "fffffffffffffffffff",
        "DRCTL_FAULT_INJECTION_TOKEN_FILE": "/x/.drctl/fault-token",
        "DRCTL_TEMPORAL_API_KEY": "kkkkkkkkkkkkkkkkkkkk",
        "DRCTL_PYTHON_SECRET": "not python's",
        "AWS_SECRET_ACCESS_KEY": "ssssssssssssssssssss",
        "GITHUB_TOKEN": "gggggggggggggggggggg",
    }
    engine = {"CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/models", "VLLM_LOGGING_LEVEL": "INFO", "LC_ALL": "C.UTF-8"}
    for name, value in {**secrets, **engine}.items():
        monkeypatch.setenv(name, value)
    pid = processes.spawn(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "i.log", env={"GIVEN": "by the caller"}
    )
    try:
        environ = _environ_of(pid)
    finally:
        processes.terminate(pid, grace_s=1.0)
    assert not set(secrets) & set(environ), sorted(set(secrets) & set(environ))
    assert not [value for value in environ.values() if value in secrets.values()]
    assert {name: environ.get(name) for name in engine} == engine
    assert environ["PATH"] == os.environ["PATH"]
    assert environ["GIVEN"] == "by the caller"


def test_inherited_env_is_an_allowlist() -> None:
    environ = {
        "PATH": "/bin",
        "PYTHONPATH": "/src",
        "DRCTL_POLICY": "p.yaml",
        "SECRET": "x",
        "NVIDIA_VISIBLE_DEVICES": "all",
    }
    assert processes.inherited_env(environ) == {"PATH": "/bin", "PYTHONPATH": "/src", "NVIDIA_VISIBLE_DEVICES": "all"}
