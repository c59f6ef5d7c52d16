"""``drctl up --with-prometheus``: the generated config, the missing-binary message, the summary line.

The Prometheus that this config drives is exercised for real in tests/integration/test_prometheus_stack.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from drctl.cli.render import summary_panel
from drctl.policies.loader import load_policy_file
from drctl.workers import stack as stack_module
from drctl.workers.binaries import MissingBinaryError
from drctl.workers.stack import LocalStack, isolated_settings, prometheus_binary, shipped_rule_files

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.geteuid() == 0:
            pytest.fail("promtool is missing: run scripts/install-system-deps.sh (Debian package `prometheus`)")
        pytest.skip("promtool is missing and we are not root: sudo apt-get install -y prometheus")
    return found


def _stack(tmp_path: Path, with_prober: bool = False, with_node_agents: bool = False) -> LocalStack:
    settings = isolated_settings(tmp_path / "state", EXAMPLE_POLICY)
    return LocalStack(
        settings,
        load_policy_file(EXAMPLE_POLICY),
        say=lambda _: None,
        with_prober=with_prober,
        with_node_agents=with_node_agents,
        with_prometheus=True,
    )


def test_generated_config_passes_promtool_check_with_the_shipped_rules(tmp_path: Path) -> None:
    stack = _stack(tmp_path, with_prober=True, with_node_agents=True)
    path = stack.write_prometheus_config()
    assert path.parent == stack.layout.root / "prometheus"
    result = subprocess.run(
        [_promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "drctl.rules.yml" in result.stdout  # the rules were checked too

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["rule_files"] == [str(p) for p in shipped_rule_files()] and config["rule_files"]
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    s = stack.settings
    assert jobs["drctl-worker"] == [f"127.0.0.1:{s.worker_metrics_port}"]
    assert jobs["drctl-worker-sdk"] == [f"127.0.0.1:{s.worker_sdk_metrics_port}"]
    assert jobs["drctl-prober"] == [f"127.0.0.1:{s.prober_metrics_port}"]
    assert jobs["temporal-server"] == [f"127.0.0.1:{s.temporal_metrics_port}"]
    assert jobs["drctl-node-agent"] == [f"127.0.0.1:{p}" for p in sorted(stack.node_agent_ports.values())]
    assert "drctl-alert-receiver" not in jobs  # it runs only with alert tokens


def test_only_the_parts_that_run_are_scraped(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.settings = stack.settings.model_copy(update={"worker_sdk_metrics_port": 0})
    assert set(stack.prometheus_targets()) == {"drctl-worker", "temporal-server"}


def test_the_prometheus_port_is_checked_free(tmp_path: Path) -> None:
    import socket

    stack = _stack(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stack.settings.prometheus_port))
        busy.listen()
        with pytest.raises(stack_module.StackError, match="Prometheus"):
            stack.check_ports_free()


@pytest.fixture
def no_prometheus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(stack_module, "PROMETHEUS_DEBIAN_BINARY", tmp_path / "no-such-prometheus")


@pytest.mark.usefixtures("no_prometheus")
async def test_without_prometheus_the_stack_starts_nothing(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    with pytest.raises(MissingBinaryError, match="apt-get install prometheus"):
        prometheus_binary()
    with pytest.raises(MissingBinaryError, match="apt-get install prometheus"):
        await stack.start()
    assert stack.pids == {}
    assert not stack.layout.root.exists()


@pytest.mark.usefixtures("no_prometheus")
def test_up_with_prometheus_fails_first_when_it_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drctl.cli.app import app

    state = tmp_path / "state"
    started: list[object] = []
    monkeypatch.setattr(stack_module.LocalStack, "start", lambda self: started.append(self))
    result = CliRunner().invoke(
        app, ["up", "--with-prometheus", "--policy", str(EXAMPLE_POLICY), "--state-dir", str(state)]
    )
    assert result.exit_code != 0
    assert "apt-get install prometheus" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert started == [] and not state.exists()


def test_the_summary_says_where_prometheus_is(tmp_path: Path) -> None:
    from rich.console import Console

    settings = isolated_settings(tmp_path, EXAMPLE_POLICY)
    policy = load_policy_file(EXAMPLE_POLICY)

    def text(url: str | None) -> str:
        console = Console(width=200, record=True)
        console.print(summary_panel(settings, policy, url))
        return console.export_text()

    shown = text(f"http://127.0.0.1:{settings.prometheus_port}")
    assert f"Prometheus       http://127.0.0.1:{settings.prometheus_port}" in shown
    assert f"worker :{settings.worker_metrics_port}" in shown
    assert "--with-prometheus" in text(None)
