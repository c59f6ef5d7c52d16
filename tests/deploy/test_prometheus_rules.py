"""deploy/prometheus/: the scrape config and the alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "drctl.rules.yml"
RULES_TEST = PROMETHEUS / "rules" / "drctl.rules.test.yml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.geteuid() == 0:
            pytest.fail("promtool is missing: run scripts/install-system-deps.sh (Debian package `prometheus`)")
        pytest.skip("promtool is missing and we are not root: sudo apt-get install -y prometheus")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def test_rules_pass_promtool_check() -> None:
    result = _run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_unit_tests() -> None:
    result = _run("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_is_valid() -> None:
    result = _run("check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts no unit test fires"


def test_scrape_config_covers_drctl_up_default_ports() -> None:
    from drctl.detectors.alert_receiver import DEFAULT_PORT
    from drctl.settings import DrctlSettings

    settings = DrctlSettings()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]} for job in config["scrape_configs"]
    }
    assert targets["drctl-worker"] == {f"127.0.0.1:{settings.worker_metrics_port}"}
    assert targets["drctl-worker-sdk"] == {f"127.0.0.1:{settings.worker_sdk_metrics_port}"}
    assert targets["drctl-prober"] == {f"127.0.0.1:{settings.prober_metrics_port}"}
    assert targets["drctl-alert-receiver"] == {f"127.0.0.1:{DEFAULT_PORT}"}
    assert f"127.0.0.1:{settings.node_agent_base_port}" in targets["drctl-node-agent"]
    assert targets["temporal-server"] == {f"127.0.0.1:{settings.temporal_metrics_port}"}
