"""deploy/kubernetes/instances: the pod of a vLLM and of an SGLang instance, as YAML, is exactly what
drctl's Kubernetes platform creates (rendered for the first model and node of examples/vllm-policy.yaml
and examples/sglang-policy.yaml), and carries what each engine needs: its server and flags, vLLM's
dev-mode variable, readiness and startup probes on the health path, one GPU. The example model in
the kustomization runs the same vLLM container (its weights from Hugging Face)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration

from drctl.payloads import ReconcileAction, ReconcileActionKind, Role
from drctl.platforms.kubernetes.platform import KubernetesPlatform
from drctl.policies.engines import Engine, profile
from drctl.policies.loader import load_policy_file

ROOT = Path(__file__).resolve().parents[2]
INSTANCES = ROOT / "deploy" / "kubernetes" / "instances"
EXAMPLES = {
    Engine.VLLM: ROOT / "examples" / "vllm-policy.yaml",
    Engine.SGLANG: ROOT / "examples" / "sglang-policy.yaml",
}

Doc = dict[str, Any]


def rendered(engine: Engine) -> Doc:
    """What the platform creates for a hot standby ``<model>-1`` of the example's first model, on GPU 1
    of its first node, in namespace drctl."""
    policy = load_policy_file(EXAMPLES[engine])
    model, node = policy.models[0].name, policy.gpu_pool.nodes[0].name
    action = ReconcileAction(
        kind=ReconcileActionKind.CREATE, model=model, instance=f"{model}-1", tier=Role.HOT, gpu=f"{node}/1", node=node
    )
    with ApiClient(Configuration(host="http://unused.invalid")) as client:
        deployment = KubernetesPlatform(client, "drctl", policy).deployment(action)
    deployment["metadata"]["namespace"] = "drctl"
    parsed: Doc = yaml.safe_load(yaml.safe_dump(deployment))  # plain data, no shared objects
    return parsed


def shipped(engine: Engine) -> Doc:
    docs = [d for d in yaml.safe_load_all((INSTANCES / f"{engine}.yaml").read_text(encoding="utf-8")) if d]
    assert len(docs) == 1
    doc: Doc = docs[0]
    return doc


def model_container(deployment: Doc) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    assert container["name"] == "model"
    return container


@pytest.fixture(params=[Engine.VLLM, Engine.SGLANG], ids=str)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield request.param


def test_the_shipped_template_is_what_the_platform_creates(engine: Engine) -> None:
    assert shipped(engine) == rendered(engine)


def test_there_is_a_template_per_engine_and_nothing_else() -> None:
    assert sorted(p.name for p in INSTANCES.iterdir()) == ["sglang.yaml", "vllm.yaml"]


def test_probes_on_the_health_path_with_a_generous_startup(engine: Engine) -> None:
    container = model_container(shipped(engine))
    health = profile(engine).health_path
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": health, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "loading weights takes minutes"
    assert "livenessProbe" not in container
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]


def test_one_gpu_requested_and_limited_and_gpu_nodes_tolerated(engine: Engine) -> None:
    deployment = shipped(engine)
    spec = deployment["spec"]["template"]["spec"]
    assert model_container(deployment)["resources"] == {
        "requests": {"nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["automountServiceAccountToken"] is False
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two pods of one instance on a GPU


def test_vllm_runs_its_openai_server_with_sleep_mode() -> None:
    container = model_container(shipped(Engine.VLLM))
    assert container["image"].startswith("vllm/vllm-openai:")
    args = container["args"]
    assert args[args.index("--served-model-name") + 1] == "llama-3-1-8b" and "--port" in args and "--model" in args
    assert "--enable-sleep-mode" in args
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in container["env"]


def test_sglang_runs_launch_server_with_the_memory_saver() -> None:
    container = model_container(shipped(Engine.SGLANG))
    assert container["image"].startswith("lmsysorg/sglang:")
    command = container["command"]
    assert command[:3] == ["python3", "-m", "sglang.launch_server"]
    assert command[command.index("--served-model-name") + 1] == "qwen-2-5-7b-instruct"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--model-path" in command and "--enable-memory-saver" in command


def test_the_example_model_runs_the_vllm_template() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/model-llama-2-7b.yaml").read_text()) if d]
    template = model_container(shipped(Engine.VLLM))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        container = model_container(deployment)
        for key in ("env", "ports", "readinessProbe", "startupProbe"):
            assert container[key] == template[key], (deployment["metadata"]["name"], key)
        assert {k: {r: str(v) for r, v in rs.items()} for k, rs in container["resources"].items()} == template[
            "resources"
        ]
        args = container["args"]
        assert args[args.index("--served-model-name") + 1] == "llama-2-7b" and "--enable-sleep-mode" in args
