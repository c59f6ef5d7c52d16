"""``drctl policy explain --gpu-figures``: warm and cold estimates from scripts/gpu_check.py's figures."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from drctl.cli.app import app

POLICY = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


def explain(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["policy", "explain", str(POLICY), *args])
    return result.exit_code, result.output


def figures(tmp_path: Path, **report: object) -> str:
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_measured_rates_replace_the_assumed_ones(tmp_path: Path) -> None:
    code, assumed = explain("--json")
    assert code == 0
    fast = figures(
        tmp_path, gpu="NVIDIA H200", gpu_figures=True, summary={"wake_gib_per_s": 100.0, "cold_load_gib_per_s": 50.0}
    )
    code, measured = explain("--json", "--gpu-figures", fast)
    assert code == 0

    def warm_rto(text: str) -> float:
        [gpt] = [m for m in json.loads(text) if m["model"] == "gpt-4-8b"]  # its first standby is warm
        [first] = [f for f in gpt["failures"] if f["failure"] == 1]
        assert first["tier"] == "warm"
        return float(first["expected_rto_s"])

    assert warm_rto(measured) < warm_rto(assumed)
    code, text = explain("--gpu-figures", fast)
    assert code == 0 and "measured on NVIDIA H200 by scripts/gpu_check.py" in text
    assert "assumed: measure them with scripts/gpu_check.py" in explain()[1]


def test_figures_that_are_no_gpu_run_are_refused(tmp_path: Path) -> None:
    dry = figures(tmp_path, gpu_figures=False, summary={"wake_gib_per_s": 1.0, "cold_load_gib_per_s": 1.0})
    code, text = explain("--gpu-figures", dry)
    assert code == 2 and "--cpu dry run" in text
    code, text = explain("--gpu-figures", figures(tmp_path, error="PyTorch is not installed"))
    assert code == 2 and "no measured rates: PyTorch is not installed" in text
    code, text = explain("--gpu-figures", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read --gpu-figures" in text and "Traceback" not in text


def test_a_serving_instance_outside_the_active_zones_is_shown(tmp_path: Path) -> None:
    """``policy explain`` says where placement had to put a serving instance in the standby zone."""
    policy = tmp_path / "full.yaml"
    policy.write_text(
        "models:\n"
        "  - {name: big-a, priority: critical, gpuMemory: 80Gi}\n"
        "  - {name: big-b, priority: high, gpuMemory: 80Gi}\n"
        "az_failover: {strategy: active-passive, activeZones: [az-1], standbyZone: az-3}\n"
        "gpuPool:\n"
        "  overcommitRatio: 1.0\n"
        "  nodes:\n"
        "    - {name: node-a, zone: az-1, gpus: 1, gpuMemory: 80Gi}\n"
        "    - {name: node-s, zone: az-3, gpus: 1, gpuMemory: 80Gi}\n"
    )
    text = CliRunner().invoke(app, ["policy", "explain", str(policy)], env={"COLUMNS": "300"})
    assert text.exit_code == 0, text.output
    assert "serves outside the active zones: big-b-0: in zone az-3, outside the active zones (az-1)" in text.output
    data = CliRunner().invoke(app, ["policy", "explain", str(policy), "--json"])
    rows = {row["model"]: row["outside_active_zones"] for row in json.loads(data.output)}
    assert rows["big-a"] == [] and rows["big-b"][0].startswith("big-b-0: in zone az-3")
