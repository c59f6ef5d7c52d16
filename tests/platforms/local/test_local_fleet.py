"""``LocalPlatform.ensure_fleet`` on a state folder that has a registry: it resumes the recorded
fleet rather than planning a new one. Real demo-server processes, no Temporal or Envoy.

- after a clean stop (``stop_all``) the instances that ran start again, in their roles, while
  one that had died before the stop keeps its dead pid (the prober's to find);
- after an unclean stop the instances still running are adopted (same pid) and dead ones left;
- a model the policy no longer has is removed, and what the policy added is left to reconciliation.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from drctl.payloads import Role
from drctl.platforms.local import processes
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings, StateLayout
from drctl.workers.stack import free_ports

# Both models run drctl's stand-in; alpha as the demo engine (its load progress), the second as
# vLLM (the default engine: readiness is the model listed by /v1/models), which the stand-in speaks.
POLICY = """\
models:
  - name: alpha
    engine: demo
    priority: critical
    hotStandby: 1
    warmStandby: 1
    coldStandby: 1
  - name: {second}
    priority: normal
local:
  checkpointSize: 64KiB
"""


@dataclass
class Fleet:
    state_dir: Path
    base_port: int
    said: list[str]

    def platform(self, second: str = "beta") -> LocalPlatform:
        policy_file = self.state_dir.parent / f"policy-{second}.yaml"
        policy_file.write_text(POLICY.format(second=second))
        settings = DrctlSettings(policy=policy_file, state_dir=self.state_dir, instance_base_port=self.base_port)
        return LocalPlatform(settings, load_policy_file(policy_file))

    def registry(self) -> dict[str, LocalInstance]:
        return self.platform().registry.load()


@pytest.fixture()
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """A fleet planned from the policy and settled: alpha-0 serving, -1 hot, -2 warm, -3 cold; beta-0."""
    [port] = free_ports(1)
    made = Fleet(tmp_path / "state", port, [])
    first = made.platform()
    first.ensure_fleet(made.said.append)
    await first.settle_fleet()
    await first.close()
    try:
        yield made
    finally:
        for instance in made.registry().values():
            if processes.runs_instance(instance.pid, instance.id):
                processes.terminate(instance.pid, grace_s=1.0)


def _kill(instance: LocalInstance) -> None:
    os.kill(instance.pid or 0, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while processes.is_alive(instance.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _eds_instances(state_dir: Path, model: str) -> dict[str, int]:
    document = yaml.safe_load(StateLayout(state_dir).eds_file(model).read_text())
    return {
        e["endpoint"]["hostname"]: group.get("priority", 0)
        for group in document["resources"][0]["endpoints"]
        for e in group["lb_endpoints"]
    }


async def test_clean_stop_then_start_restarts_what_ran(fleet: Fleet) -> None:
    planned = fleet.registry()
    assert {i.id: i.role for i in planned.values()} == {
        "alpha-0": Role.SERVING,
        "alpha-1": Role.HOT,
        "alpha-2": Role.WARM,
        "alpha-3": Role.COLD,
        "beta-0": Role.SERVING,
    }
    # Before the stop: alpha-1 was ejected (failed, process gone); beta-0 died, not noticed yet.
    _kill(planned["alpha-1"])
    fleet.platform().registry.update("alpha-1", role=Role.FAILED, lb_priority=None, note="ejected")
    _kill(planned["beta-0"])

    assert fleet.platform().stop_all() == 2
    stopped = fleet.registry()
    assert stopped["alpha-0"].pid is None and stopped["alpha-2"].pid is None
    assert stopped["beta-0"].pid == planned["beta-0"].pid  # it died on its own: the stop did not end it
    assert not any(processes.is_alive(i.pid) for i in planned.values())

    said: list[str] = []
    again = fleet.platform()
    again.ensure_fleet(said.append)
    await again.settle_fleet()
    await again.close()
    resumed = fleet.registry()
    assert {i.id: (i.role, i.gpu) for i in resumed.values()} == {i.id: (i.role, i.gpu) for i in stopped.values()}
    assert resumed["alpha-0"].role == Role.SERVING and resumed["alpha-0"].lb_priority == 0
    assert processes.runs_instance(resumed["alpha-0"].pid, "alpha-0")
    assert resumed["alpha-0"].pid != planned["alpha-0"].pid
    assert resumed["alpha-2"].role == Role.WARM and resumed["alpha-2"].lb_priority is None
    async with httpx.AsyncClient() as http:  # loaded and put back to sleep, as a warm standby is
        asleep = await http.get(f"http://127.0.0.1:{resumed['alpha-2'].port}/is_sleeping")
    assert asleep.json() == {"is_sleeping": True}
    assert resumed["alpha-1"].role == Role.FAILED and not processes.is_alive(resumed["alpha-1"].pid)
    assert resumed["alpha-3"].role == Role.COLD and resumed["alpha-3"].pid is None
    # beta-0 is left dead and registered, for the prober to find and fail over.
    assert resumed["beta-0"].role == Role.SERVING and resumed["beta-0"].pid == planned["beta-0"].pid
    assert _eds_instances(fleet.state_dir, "alpha") == {"alpha-0": 0}
    assert _eds_instances(fleet.state_dir, "beta") == {"beta-0": 0}
    lines = "\n".join(said)
    assert "restarted alpha-0 (serving, " in lines and "restarted alpha-2 (warm, " in lines
    assert f"WARNING: beta-0 (serving, {planned['beta-0'].gpu}): process {planned['beta-0'].pid} died" in lines
    # alpha-1's replacement is reconciliation's to create, with the next id.
    assert "the fleet differs from the policy (" in lines and "create alpha-4 (hot)" in lines


async def test_unclean_stop_adopts_the_living_and_drops_removed_models(fleet: Fleet) -> None:
    planned = fleet.registry()
    _kill(planned["alpha-0"])
    said: list[str] = []
    again = fleet.platform(second="gamma")  # beta left the policy, gamma joined it
    again.ensure_fleet(said.append)
    await again.settle_fleet()
    await again.close()
    resumed = fleet.registry()
    for instance_id in ("alpha-1", "alpha-2"):
        assert resumed[instance_id].pid == planned[instance_id].pid
        assert processes.runs_instance(resumed[instance_id].pid, instance_id)
    assert resumed["alpha-1"].lb_priority == 1 and resumed["alpha-2"].lb_priority is None
    assert resumed["alpha-0"].role == Role.SERVING and resumed["alpha-0"].pid == planned["alpha-0"].pid
    assert _eds_instances(fleet.state_dir, "alpha") == {"alpha-0": 0, "alpha-1": 1}
    assert "beta-0" not in resumed and not processes.is_alive(planned["beta-0"].pid)
    assert not any(i.model == "gamma" for i in resumed.values())
    lines = "\n".join(said)
    assert f"adopted alpha-1 (hot, {planned['alpha-1'].gpu}): pid {planned['alpha-1'].pid} still running" in lines
    assert "removed beta-0: beta is no longer in the policy" in lines
    assert "create gamma-0 (serving)" in lines and "the reconcile schedule converges it" in lines
