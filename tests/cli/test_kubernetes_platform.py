"""``drctl failover`` and ``drctl status`` with ``DRCTL_PLATFORM=kubernetes``: model and instance are
checked, and the fleet is read, through the Platform interface — here against kmock's Kubernetes
emulator over HTTP, found through a kubeconfig as a cluster would be — never a local state file.

The CLI runs in a thread (it runs its own event loop), while the emulator serves on the test's. The
kubernetes client reads ``$KUBECONFIG`` once, when it is first imported (earlier in the session,
by another test): the fixture points its default location at this test's kubeconfig too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes.config.kube_config
import pytest
import pytest_asyncio
import yaml
from typer.testing import CliRunner, Result

from drctl.cli.app import app
from tests.platforms.kubernetes.cluster import CONFIGMAPS, DEPLOYMENTS, NODES, PODS, Emulator

NS = "fleet"
POLICY = {
    "models": [{"name": "llama", "hotStandby": 1, "warmStandby": 0, "coldStandby": 0}],
    "gpuPool": {"nodes": [{"name": "node-1", "zone": "az-1", "gpus": 2}]},
}


def deployment(instance: str, role: str, serving: bool) -> dict[str, Any]:
    labels = {
        "drctl.io/model": "llama",
        "drctl.io/instance": instance,
        "drctl.io/role": role,
        "drctl.io/serving": "true" if serving else "false",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": instance, "namespace": NS, "labels": labels, "annotations": {"drctl.io/gpu": "node-1/0"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"drctl.io/model": "llama", "drctl.io/instance": instance}},
            "template": {"metadata": {"labels": labels}},
        },
    }


def pod(instance: str, role: str, serving: bool) -> dict[str, Any]:
    labels = {
        "drctl.io/model": "llama",
        "drctl.io/instance": instance,
        "drctl.io/role": role,
        "drctl.io/serving": "true" if serving else "false",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{instance}-abc", "namespace": NS, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "model", "ports": [{"containerPort": 8000}]}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest_asyncio.fixture()
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Emulator, dict[str, str]]]:
    """The emulator, and the environment that points drctl at it (kubeconfig, namespace, policy)."""
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.objects[NODES, None, "node-1"] = {
            "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "az-1"}}
        }
        for resource in (PODS, DEPLOYMENTS, CONFIGMAPS):
            emulator.resources[resource] = kmock.ResourceInfo()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": str(emulator.url).rstrip("/")}}],
                    "users": [{"name": "drctl", "user": {"token": "unused"}}],
                    "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "drctl"}}],
                    "current-context": "emulator",
                }
            )
        )
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        policy = tmp_path / "dr-policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        env = {
            "KUBECONFIG": str(kubeconfig),
            "DRCTL_PLATFORM": "kubernetes",
            "DRCTL_KUBERNETES_NAMESPACE": NS,
            "DRCTL_POLICY": str(policy),
            "DRCTL_STATE_DIR": str(tmp_path / "no-local-state"),  # never read on Kubernetes
            "DRCTL_TEMPORAL_ADDRESS": "127.0.0.1:1",  # nothing answers: commands get that far only
        }
        yield emulator, env


async def drctl(env: dict[str, str], *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(lambda: runner.invoke(app, list(args), env=env))


def text(result: Result) -> str:
    return " ".join(result.output.split())


async def test_failover_checks_the_instance_in_the_cluster(cluster: tuple[Emulator, dict[str, str]]) -> None:
    emulator, env = cluster
    result = await drctl(env, "failover", "llama", "llama-0")
    assert result.exit_code == 2, result.output
    assert "error: no instances of llama in Kubernetes namespace 'fleet'" in text(result)

    emulator.objects[DEPLOYMENTS, NS, "llama-0"] = deployment("llama-0", "serving", True)
    emulator.objects[PODS, NS, "llama-0-abc"] = pod("llama-0", "serving", True)
    emulator.objects[DEPLOYMENTS, NS, "llama-1"] = deployment("llama-1", "hot", False)  # no pod yet
    result = await drctl(env, "failover", "llama", "llama-9")
    assert result.exit_code == 2, result.output
    assert "error: llama has no instance 'llama-9'; known: llama-0, llama-1" in text(result)
    assert not await asyncio.to_thread(Path(env["DRCTL_STATE_DIR"]).exists), "no local state is read or written"

    # A known instance passes the check and the command goes on to Temporal (unreachable here: 1).
    result = await drctl(env, "failover", "llama", "llama-1", "--no-wait")
    assert result.exit_code == 1, result.output
    assert "cannot reach Temporal at 127.0.0.1:1" in text(result)


async def test_failover_on_an_unreachable_cluster_says_so(cluster: tuple[Emulator, dict[str, str]]) -> None:
    _, env = cluster
    path = Path(env["KUBECONFIG"])
    kubeconfig = yaml.safe_load(await asyncio.to_thread(path.read_text))
    kubeconfig["clusters"][0]["cluster"]["server"] = "http://127.0.0.1:1"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(kubeconfig))
    result = await drctl(env, "failover", "llama", "llama-0")
    assert result.exit_code == 1, result.output
    assert "cannot read the fleet from Kubernetes namespace 'fleet'" in text(result)
    assert "Traceback" not in result.output


async def test_status_reads_the_fleet_from_the_cluster(cluster: tuple[Emulator, dict[str, str]]) -> None:
    emulator, env = cluster
    # llama-1 was promoted; its pod was recreated from the template since, and says "hot" again:
    # the Deployment's record is what status shows.
    emulator.objects[DEPLOYMENTS, NS, "llama-0"] = deployment("llama-0", "failed", False)
    emulator.objects[DEPLOYMENTS, NS, "llama-1"] = deployment("llama-1", "serving", True)
    emulator.objects[PODS, NS, "llama-1-abc"] = pod("llama-1", "hot", False)
    emulator.objects[CONFIGMAPS, NS, "drctl-cordoned-gpus"] = {
        "metadata": {"name": "drctl-cordoned-gpus", "namespace": NS},
        "data": {"cordoned.json": json.dumps({"node-1/1": "xid 79"})},
    }
    result = await drctl(env, "status", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["instance"]: row for row in json.loads(result.output)}
    assert rows["llama-1"]["role"] == "serving" and rows["llama-1"]["lb_priority"] == 0
    assert rows["llama-1"]["address"] == "10.0.0.9:8000" and rows["llama-1"]["zone"] == "az-1"
    assert rows["llama-1"]["serves"] is True and rows["llama-1"]["process"] == "llama-1-abc"
    assert rows["llama-0"]["role"] == "failed" and rows["llama-0"]["serves"] is False
    # The pod's labels are left as they are: a CLI only reads (a worker re-labels it).
    assert emulator.objects[PODS, NS, "llama-1-abc"]["metadata"]["labels"]["drctl.io/role"] == "hot"

    table = await drctl(env, "status")
    assert table.exit_code == 0, table.output
    assert "platform: kubernetes; cordoned GPUs: node-1/1" in text(table)
    assert "llama-1" in table.output and "no local stack state" not in table.output


@pytest.mark.parametrize("args", [["failover", "nope", "x-0"], ["status", "--json"]])
async def test_unknown_model_and_empty_cluster(cluster: tuple[Emulator, dict[str, str]], args: list[str]) -> None:
    _, env = cluster
    result = await drctl(env, *args)
    if args[0] == "failover":
        assert result.exit_code == 2 and "error: unknown model 'nope'; the policy has: llama" in text(result)
    else:
        assert result.exit_code == 0 and json.loads(result.output) == []
