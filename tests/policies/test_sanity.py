"""``drctl policy validate``'s warnings: what the schema accepts but is most likely a mistake."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.policies.loader import load_policy_file, parse_policy
from drctl.policies.sanity import policy_warnings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"
DUBIOUS = """\
models:
  - name: m
    hotStandby: 40
    gpuMemory: 40Gi
gpuPool:
  nodes:
    - {name: n0, zone: az-1, gpus: 1, gpuMemory: 80Gi}
az_failover:
  activeZones: [az-1, az-9]
  standbyZone: az-1
reconcile:
  interval: 1ms
"""


def test_the_example_policy_has_nothing_to_warn_about() -> None:
    assert policy_warnings(load_policy_file(EXAMPLE)) == []


def test_each_dubious_setting_is_warned_about_by_its_field() -> None:
    warnings = policy_warnings(parse_policy(DUBIOUS, "dubious.yaml"))
    fields = [w.split(":", 1)[0] for w in warnings]
    assert fields == ["az_failover.activeZones", "az_failover.standbyZone", "reconcile.interval", "gpuPool"]
    assert "az-9 has no node" in warnings[0]
    assert "also an active zone" in warnings[1]
    assert "1 ms" in warnings[2]
    # 1 serving + 40 hot on one 80 GiB GPU of 40 GiB models: 39 do not fit, the first named with why.
    assert "39 instance(s)" in warnings[3] and "m-2 (hot)" in warnings[3] and "... and 34 more" in warnings[3]


def test_validate_prints_the_warnings_and_exits_2_only_with_strict(tmp_path: Path) -> None:
    path = tmp_path / "dubious.yaml"
    path.write_text(DUBIOUS)
    result = CliRunner().invoke(app, ["policy", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: ") == 4
    strict = CliRunner().invoke(app, ["policy", "validate", str(path), "--strict"])
    assert strict.exit_code == 2
    clean = CliRunner().invoke(app, ["policy", "validate", str(EXAMPLE), "--strict"])
    assert clean.exit_code == 0 and "warning" not in clean.output
