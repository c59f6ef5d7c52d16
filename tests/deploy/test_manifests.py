"""deploy/kubernetes: every document parses and names itself, kustomize lists every file, and the
RBAC grants exactly what drctl's Kubernetes platform calls, nothing more (no cluster needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from drctl.detectors.kube_watcher import WATCH_VERBS
from drctl.platforms.kubernetes.platform import API_PERMISSIONS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
NAMESPACE = "drctl"
IMAGE = "ghcr.io/example/drctl:0.1.0"

CODE_USES = {
    key: API_PERMISSIONS.get(key, frozenset()) | WATCH_VERBS.get(key, frozenset())
    for key in API_PERMISSIONS.keys() | WATCH_VERBS.keys()
}
"""(apiGroup, resource) → the API verbs the code calls, declared next to the calls (the platform's
``API_PERMISSIONS``, the watcher's ``WATCH_VERBS``); rbac.yaml must grant exactly these."""

CLUSTER_SCOPED = {("", "nodes")}
READ_VERBS = frozenset({"get", "list", "watch"})

Doc = dict[str, Any]


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")])


def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def objects() -> list[tuple[Path, Doc]]:
    return [(p, d) for p in yaml_files() if p.name != "kustomization.yaml" for d in load_docs(p)]


def of_kind(kind: str) -> list[Doc]:
    return [d for _, d in objects() if d["kind"] == kind]


def one(kind: str, name: str) -> Doc:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def walk(node: Any) -> list[Any]:
    """Every value in a parsed document, keys and scalars included."""
    if isinstance(node, dict):
        return [*node.keys(), *(v for value in node.values() for v in walk(value))]
    if isinstance(node, list):
        return [v for item in node for v in walk(item)]
    return [node]


def granted(kind: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for role in of_kind(kind):
        for rule in role.get("rules", []):
            assert "nonResourceURLs" not in rule, f"{kind} {role['metadata']['name']}: nonResourceURLs"
            assert "resourceNames" not in rule or rule["resourceNames"], "empty resourceNames"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out[(group, resource)] |= set(rule["verbs"])
    return dict(out)


# -- every file, every document --------------------------------------------------------------------


def test_there_are_manifests() -> None:
    assert (DEPLOY / "kustomization.yaml").is_file()
    assert len(yaml_files()) > 1


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_every_document_parses_and_names_itself(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} has no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        assert doc.get("apiVersion"), f"{path.name}: a document has no apiVersion"
        assert doc.get("kind"), f"{path.name}: a document has no kind"
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} has no metadata.name"


def test_names_are_unique_per_kind_and_namespace() -> None:
    seen: set[tuple[str, str, str]] = set()
    for path, doc in objects():
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in seen, f"{path.name}: {key} defined twice"
        seen.add(key)


def test_namespaced_objects_live_in_drctl() -> None:
    cluster_kinds = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for path, doc in objects():
        if doc["kind"] in cluster_kinds:
            assert "namespace" not in doc["metadata"], f"{path.name}: {doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} outside {NAMESPACE}"
    assert one("Namespace", NAMESPACE)


def test_kustomization_lists_every_file_and_only_existing_ones() -> None:
    kustomization = load_docs(DEPLOY / "kustomization.yaml")[0]
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    on_disk = {p.name for p in yaml_files()} - {"kustomization.yaml"}
    assert set(resources) == on_disk
    assert kustomization.get("namespace") == NAMESPACE


# -- RBAC ------------------------------------------------------------------------------------------


def test_rbac_grants_exactly_what_the_code_uses() -> None:
    namespaced = granted("Role")
    cluster = granted("ClusterRole")
    want_namespaced = {k: set(v) for k, v in CODE_USES.items() if k not in CLUSTER_SCOPED}
    want_cluster = {k: set(v) for k, v in CODE_USES.items() if k in CLUSTER_SCOPED}
    assert namespaced == want_namespaced
    assert cluster == want_cluster


def test_no_wildcards_anywhere_in_rbac() -> None:
    for kind in ("Role", "ClusterRole"):
        for role in of_kind(kind):
            assert "aggregationRule" not in role, f"{kind} {role['metadata']['name']} aggregates other roles"
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    for value in rule.get(field, []):
                        assert "*" not in value, f"{kind} {role['metadata']['name']}: wildcard in {field}"


def test_nodes_only_in_the_cluster_role_and_read_only() -> None:
    for _group, resource in granted("Role"):
        assert resource != "nodes", "nodes are cluster-scoped: a Role cannot grant them"
    cluster = granted("ClusterRole")
    assert set(cluster) == {("", "nodes")}, "the ClusterRole grants only nodes"
    assert cluster[("", "nodes")] <= READ_VERBS


def test_bindings_give_the_roles_to_the_drctl_service_account() -> None:
    assert one("ServiceAccount", "drctl")
    for binding_kind, role_kind in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        roles = {r["metadata"]["name"] for r in of_kind(role_kind)}
        bindings = of_kind(binding_kind)
        assert {b["roleRef"]["name"] for b in bindings} == roles, f"every {role_kind} is bound"
        for binding in bindings:
            assert binding["roleRef"]["kind"] == role_kind
            assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "drctl", "namespace": NAMESPACE}]


def test_only_the_worker_gets_an_api_token() -> None:
    for workload in [*of_kind("Deployment"), *of_kind("DaemonSet")]:
        spec = workload["spec"]["template"]["spec"]
        if workload["metadata"]["name"] == "drctl-worker":
            assert spec["serviceAccountName"] == "drctl"
            assert spec.get("automountServiceAccountToken", True) is True
        else:
            assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]


# -- workloads -------------------------------------------------------------------------------------


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def test_worker_and_receiver_get_temporal_settings() -> None:
    env_config = one("ConfigMap", "drctl-env")["data"]
    assert env_config["DRCTL_TEMPORAL_ADDRESS"].rpartition(":")[2].isdigit()
    assert env_config["DRCTL_TEMPORAL_NAMESPACE"]
    for name in ("drctl-worker", "drctl-alert-receiver"):
        for container in one("Deployment", name)["spec"]["template"]["spec"]["containers"]:
            assert container["image"] == IMAGE
            assert {"configMapRef": {"name": "drctl-env"}} in container["envFrom"], name


def test_drctl_commands_are_the_documented_modules() -> None:
    modules = {
        "drctl-worker": ["drctl.workers.runbook_worker", "drctl.detectors.kube_watcher"],
        "drctl-alert-receiver": ["drctl.detectors.alert_receiver"],
        "drctl-node-agent": ["drctl.detectors.gpu_node_agent"],
    }
    for workload in [*of_kind("Deployment"), *of_kind("DaemonSet")]:
        name = workload["metadata"]["name"]
        if name in modules:
            commands = [c["command"][:3] for c in containers(workload)]
            assert commands == [["python", "-m", module] for module in modules[name]], name
            for module in modules[name]:
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def test_policy_configmap_is_the_example_policy_on_vllm() -> None:
    """The example policy, but its models run vLLM: the demo stand-in has no pod template."""
    policy = one("ConfigMap", "drctl-policy")["data"]["dr-policy.yaml"]
    example = (ROOT / "examples" / "dr-policy.yaml").read_text(encoding="utf-8")

    def without_engines(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.strip().startswith("engine:")]

    assert without_engines(policy) == without_engines(example)
    models = yaml.safe_load(policy)["models"]
    assert [m["engine"] for m in models] == ["vllm"] * len(yaml.safe_load(example)["models"])


def test_alert_receiver_reads_tokens_from_a_mounted_secret() -> None:
    deployment = one("Deployment", "drctl-alert-receiver")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    tokens_file = env_of(container)["DRCTL_ALERT_TOKENS_FILE"]["value"]
    assert "DRCTL_ALERT_TOKENS" not in env_of(container), "tokens only from the file"
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
    assert any(tokens_file.startswith(m["mountPath"].rstrip("/") + "/") and m.get("readOnly") for m in mounts)
    assert "0.0.0.0" in container["command"] and "9095" in container["command"]
    assert container["ports"][0]["containerPort"] == 9095

    service = one("Service", "drctl-alert-receiver")
    assert service["spec"]["ports"][0]["port"] == 9095
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_node_agent_runs_on_gpu_nodes_and_names_its_node() -> None:
    daemonset = one("DaemonSet", "drctl-node-agent")
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = env_of(container)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    command = container["command"]
    assert command[command.index("--node") + 1] == "$(NODE_NAME)"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9400"
    assert env["DRCTL_HOST"]["value"] == "0.0.0.0"
    assert any(k.startswith("nvidia.com/gpu") for k in spec["nodeSelector"])
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    port = container["ports"][0]
    served = port.get("hostPort") == 9400 or any(
        p["port"] == 9400
        for s in of_kind("Service")
        if s["metadata"]["name"] == "drctl-node-agent"
        for p in s["spec"]["ports"]
    )
    assert port["containerPort"] == 9400 and served


def test_drctl_containers_are_locked_down() -> None:
    for workload in [*of_kind("Deployment"), *of_kind("DaemonSet")]:
        spec = workload["spec"]["template"]["spec"]
        if not any(c["image"] == IMAGE for c in spec["containers"]):
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "privileged" not in sc


# -- the example model -----------------------------------------------------------------------------


LABELS = ("drctl.io/model", "drctl.io/role", "drctl.io/instance", "drctl.io/serving")


def model_deployments() -> list[Doc]:
    return [d for d in of_kind("Deployment") if "drctl.io/model" in d["spec"]["template"]["metadata"]["labels"]]


def test_model_pods_carry_drctl_labels() -> None:
    deployments = model_deployments()
    assert deployments
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert set(LABELS) <= labels.keys(), deployment["metadata"]["name"]
        assert labels["drctl.io/serving"] in ("true", "false"), "label values are strings"
        assert labels["drctl.io/instance"] == deployment["metadata"]["name"]
        assert labels["drctl.io/instance"].startswith(labels["drctl.io/model"] + "-")
        assert (labels["drctl.io/serving"] == "true") == (labels["drctl.io/role"] == "serving")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "drctl.io/serving" not in deployment["spec"]["selector"]["matchLabels"], "serving changes"


def test_model_service_selects_only_serving_pods() -> None:
    service = one("Service", "llama-2-7b")
    selector = service["spec"]["selector"]
    assert selector == {"drctl.io/model": "llama-2-7b", "drctl.io/serving": "true"}
    selected = [
        d["metadata"]["name"]
        for d in model_deployments()
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected == ["llama-2-7b-0"]
    assert any(
        d["spec"]["template"]["metadata"]["labels"]["drctl.io/serving"] == "false" for d in model_deployments()
    ), "the example has a standby the Service does not select"


def test_no_secret_values_in_the_manifests() -> None:
    assert not of_kind("Secret"), "secrets are created out of band (docs/deploy.md), never committed"
    for _, doc in objects():
        assert not any(isinstance(v, str) and v.startswith("DRCTL_ALERT_TOKENS=") for v in walk(doc))
