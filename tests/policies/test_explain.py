"""`drctl policy explain`: what the example policy implies, per model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from drctl.payloads import Role
from drctl.policies.explain import explain
from drctl.policies.loader import load_policy_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


def test_tiers_memory_and_rto_per_failure() -> None:
    by_name = {e.name: e for e in explain(load_policy_file(EXAMPLE))}
    llama = by_name["llama-2-7b"]
    assert llama.instances == {Role.SERVING: 1, Role.HOT: 2, Role.WARM: 0, Role.COLD: 1}
    # 1 serving + 2 hot loaded (16 GiB each) and 1 cold reserved, spread over the zones.
    loaded = sum(z["loaded"] for z in llama.memory_by_zone.values())
    reserved = sum(z["reserved"] for z in llama.memory_by_zone.values())
    assert (loaded, reserved) == (3 * 16 * 2**30, 16 * 2**30)
    assert len(llama.memory_by_zone) == 3
    # Two hot standbys meet the 10 s target; the third failure falls to cold, which cannot.
    assert [(f.tier, f.meets_target) for f in llama.failures] == [
        (Role.HOT, True), (Role.HOT, True), (Role.COLD, False), (None, False),
    ]  # fmt: skip
    assert all(f.meets_target for f in by_name["gpt-4-8b"].failures)  # 5 min target
    warm = by_name["mistral-7b"].failures[1]
    assert warm.tier == Role.WARM and by_name["mistral-7b"].failures[0].expected_rto_s < warm.expected_rto_s


def test_cli_explain_table_and_json() -> None:
    drctl = str(Path(sys.executable).parent / "drctl")
    table = subprocess.run([drctl, "policy", "explain", str(EXAMPLE)], capture_output=True, text=True, check=False)
    assert table.returncode == 0, table.stderr
    assert "llama-2-7b" in table.stdout and "misses target" in table.stdout
    as_json = subprocess.run(
        [drctl, "policy", "explain", str(EXAMPLE), "--json"], capture_output=True, text=True, check=False
    )
    rows = json.loads(as_json.stdout)
    assert [r["model"] for r in rows] == ["llama-2-7b", "mistral-7b", "gpt-4-8b"]
    assert rows[0]["failures"][2] == {"failure": 3, "tier": "cold", "expected_rto_s": 15.1, "meets_target": False}
