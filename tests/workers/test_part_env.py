"""Each process `drctl up` starts gets its settings and only the secrets it uses."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from drctl.platforms.local import processes
from drctl.settings import DrctlSettings, is_loopback
from drctl.workers.part_env import is_secret, part_environment

ALERT_TOKENS = '{"team-a": "aaaaaaaaaaaaaaaaaaaaaaaa"}'
FAULT_TOKEN = "ffffffffffffffffffffffff"
API_KEY = "kkkkkkkkkkkkkkkkkkkkkkkk"
ENVIRON = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/op",
    "DRCTL_ALERT_TOKENS": ALERT_TOKENS,
    "DRCTL_ALERT_RECEIVER_PORT": "9096",
    "DRCTL_ALERTMANAGER_URL": "http://127.0.0.1:9093",
    "DRCTL_SOME_PASSWORD": "pppppppppppp",
    "AWS_SECRET_ACCESS_KEY": "ssssssssssss",
}
NODES = ("gpu-node-0", "gpu-node-1")


@pytest.fixture
def settings(tmp_path: Path) -> DrctlSettings:
    return DrctlSettings(
        policy=Path("examples/dr-policy.yaml"),
        state_dir=tmp_path,
        temporal_api_key=SecretStr(API_KEY),
        temporal_tls_key=tmp_path / "client.key",
        fault_injection_token=SecretStr(FAULT_TOKEN),
        fault_injection_token_file=tmp_path / "fault-token",
        node_agent_urls=["http://127.0.0.1:9400"],
    )


def _env(settings: DrctlSettings, part: str) -> dict[str, str]:
    return part_environment(settings, part, node_names=NODES, state_root=Path("/state"), environ=ENVIRON)


@pytest.mark.parametrize(
    ("part", "alert", "fault"),
    [("worker", False, True), ("prober", False, False), ("alert_receiver", True, False), ("gpu-node-1", False, True)],
)
def test_each_part_gets_the_secrets_it_uses(settings: DrctlSettings, part: str, alert: bool, fault: bool) -> None:
    env = _env(settings, part)
    # Every part talks to Temporal.
    assert env["DRCTL_TEMPORAL_API_KEY"] == API_KEY and env["DRCTL_TEMPORAL_TLS_KEY"].endswith("client.key")
    assert ("DRCTL_ALERT_TOKENS" in env) is alert
    assert (env.get("DRCTL_FAULT_INJECTION_TOKEN") == FAULT_TOKEN) is fault
    assert ("DRCTL_FAULT_INJECTION_TOKEN_FILE" in env) is fault
    # Settings and non-secret DRCTL_* variables reach every part, as pydantic-settings reads them.
    assert env["DRCTL_NODE_AGENT_URLS"] == '["http://127.0.0.1:9400"]'
    assert env["DRCTL_ALERT_RECEIVER_PORT"] == "9096" and env["DRCTL_ALERTMANAGER_URL"] == "http://127.0.0.1:9093"
    assert env["DRCTL_STATE_DIR"] == "/state" and env["DRCTL_POLICY"].endswith("examples/dr-policy.yaml")
    assert env["PATH"] == "/usr/bin:/bin" and env["PYTHONUNBUFFERED"] == "1"
    # A secret no part is known to use goes nowhere.
    assert "DRCTL_SOME_PASSWORD" not in env and "AWS_SECRET_ACCESS_KEY" not in env


def test_secret_names() -> None:
    assert is_secret("DRCTL_FAULT_INJECTION_TOKEN_FILE") and is_secret("DRCTL_TEMPORAL_API_KEY")
    assert is_secret("DRCTL_ALERT_TOKENS") and is_secret("DRCTL_NEW_THING_SECRET")
    assert not is_secret("DRCTL_POLICY") and not is_secret("DRCTL_NODE_AGENT_URLS")


def _environ_after_exec(pid: int, timeout_s: float = 10.0) -> bytes:
    """The child's environ once it runs the command: between fork and exec /proc shows the
    parent's or, during exec, an empty environ (a fresh-clone CI run read b'' once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if b"time.sleep(30)" in Path(f"/proc/{pid}/cmdline").read_bytes():
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            if environ:
                return environ
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exec its command in {timeout_s} s")


def test_the_processes_environ_holds_only_its_secrets(settings: DrctlSettings, tmp_path: Path) -> None:
    """Read back from /proc/PID/environ of a real child, as an attacker on the host would."""
    pids = {}
    try:
        for part in ("prober", "alert_receiver", "worker"):
            env = _env(settings, part)
            pids[part] = processes.spawn([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "p.log", env)
        environs = {part: _environ_after_exec(pid) for part, pid in pids.items()}
    finally:
        for pid in pids.values():
            processes.terminate(pid, grace_s=1.0)
    assert ALERT_TOKENS.encode() not in environs["prober"] and FAULT_TOKEN.encode() not in environs["prober"]
    assert (
        ALERT_TOKENS.encode() in environs["alert_receiver"] and FAULT_TOKEN.encode() not in environs["alert_receiver"]
    )
    assert FAULT_TOKEN.encode() in environs["worker"] and ALERT_TOKENS.encode() not in environs["worker"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True)]
    + [("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("gpu-node-0", False), ("", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
