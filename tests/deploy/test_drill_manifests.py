"""deploy/kubernetes/drills: the opt-in component for fault injection. It is not in the default
kustomization; its Role and ClusterRole grant exactly the verbs the fault injector declares
(``FAULT_PERMISSIONS``, beside the calls in drctl/platforms/kubernetes/faults.py, as
``API_PERMISSIONS`` is for the platform); and its patches turn injection on where the code reads
it (settings that exist, a token file that is a mounted Secret, the agents' flag). Rendered with
``kubectl kustomize`` where kubectl exists."""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from drctl.platforms.kubernetes.faults import FAULT_PERMISSIONS
from drctl.settings import DrctlSettings
from tests.deploy.kube_tools import tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
DRILLS = DEPLOY / "drills"
NAMESPACE = "drctl"
CLUSTER_SCOPED = {("", "nodes"), ("", "nodes/status")}
TOKEN_SECRET = "drctl-fault-token"

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def component() -> Doc:
    return load_docs(DRILLS / "kustomization.yaml")[0]


def rbac(kind: str) -> list[Doc]:
    return [d for d in load_docs(DRILLS / "rbac.yaml") if d["kind"] == kind]


def granted(kind: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for role in rbac(kind):
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out[(group, resource)] |= set(rule["verbs"])
    return dict(out)


def setting_of(env: str) -> str:
    """``DRCTL_FOO_BAR`` → the DrctlSettings field ``foo_bar`` (which must exist)."""
    assert env.startswith("DRCTL_"), env
    field = env.removeprefix("DRCTL_").lower()
    assert field in DrctlSettings.model_fields, f"{env} sets no setting"
    return field


# -- opt-in, not default ------------------------------------------------------------------------------


def test_the_drills_component_is_not_part_of_the_default_deploy() -> None:
    default = load_docs(DEPLOY / "kustomization.yaml")[0]
    listed = [*default.get("resources", []), *default.get("components", [])]
    assert not any("drills" in entry for entry in listed), listed
    assert component()["kind"] == "Component"
    assert component()["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"


def test_the_component_lists_every_file_in_its_folder() -> None:
    spec = component()
    listed = [*spec["resources"], *(p["path"] for p in spec["patches"] if "path" in p)]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in DRILLS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


# -- RBAC: exactly the injector's verbs ---------------------------------------------------------------


def test_drill_rbac_grants_exactly_the_verbs_the_injector_declares() -> None:
    want = {key: set(verbs) for key, verbs in FAULT_PERMISSIONS.items()}
    assert granted("Role") == {k: v for k, v in want.items() if k not in CLUSTER_SCOPED}
    assert granted("ClusterRole") == {k: v for k, v in want.items() if k in CLUSTER_SCOPED}


def test_drill_roles_are_bound_to_the_worker_only_and_have_no_wildcards() -> None:
    for role_kind, binding_kind in (("Role", "RoleBinding"), ("ClusterRole", "ClusterRoleBinding")):
        roles = {r["metadata"]["name"] for r in rbac(role_kind)}
        bindings = rbac(binding_kind)
        assert roles == {"drctl-drills"} and {b["roleRef"]["name"] for b in bindings} == roles
        for binding in bindings:
            assert binding["roleRef"]["kind"] == role_kind
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "drctl", "namespace": NAMESPACE}]
        for role in rbac(role_kind):
            assert "aggregationRule" not in role
            for rule in role["rules"]:
                assert not any("*" in v for field in ("apiGroups", "resources", "verbs") for v in rule[field])
    for doc in load_docs(DRILLS / "rbac.yaml"):
        if doc["kind"].startswith("Cluster"):
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE


# -- the patches: what they turn on --------------------------------------------------------------------


def patched(kind: str, name: str) -> Doc:
    (doc,) = [
        d
        for p in component()["patches"]
        if "path" in p
        for d in load_docs(DRILLS / p["path"])
        if (d["kind"], d["metadata"]["name"]) == (kind, name)
    ]
    return doc


def base(kind: str, name: str) -> Doc:
    (doc,) = [
        d
        for p in sorted(DEPLOY.glob("*.yaml"))
        for d in load_docs(p)
        if (d.get("kind"), d.get("metadata", {}).get("name")) == (kind, name)
    ]
    return doc


def token_mounted(spec: Doc, container: Doc) -> str:
    """The token file the container is told to read, checked to be in a mount of the Secret."""
    path = {e["name"]: e.get("value") for e in container["env"]}["DRCTL_FAULT_INJECTION_TOKEN_FILE"]
    secrets = {v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == TOKEN_SECRET}
    assert any(
        m["name"] in secrets and m.get("readOnly") and path.startswith(m["mountPath"].rstrip("/") + "/")
        for m in container["volumeMounts"]
    ), path
    return str(path)


def test_the_worker_patch_opts_in_reaches_the_agents_and_tolerates_the_drill_taint() -> None:
    patch = patched("Deployment", "drctl-worker")
    spec = patch["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] in {
        c["name"] for c in base("Deployment", "drctl-worker")["spec"]["template"]["spec"]["containers"]
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        setting_of(name)
    assert DrctlSettings.model_validate({setting_of(k): v for k, v in env.items()}).kubernetes_fault_injection
    assert "{model}" in env["DRCTL_DRILL_LB_URL"]
    assert env["DRCTL_NODE_AGENT_SERVICE"].startswith(base("Service", "drctl-node-agent")["metadata"]["name"] + ".")
    token_mounted(spec, container)
    assert {"key": "drctl.io/drill", "operator": "Exists", "effect": "NoExecute"} in spec["tolerations"]


def test_the_node_agent_patch_turns_its_fault_endpoints_on_with_the_token() -> None:
    patch = patched("DaemonSet", "drctl-node-agent")
    spec = patch["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert (
        container["name"] == base("DaemonSet", "drctl-node-agent")["spec"]["template"]["spec"]["containers"][0]["name"]
    )
    token_mounted(spec, container)
    (flag,) = [p for p in component()["patches"] if "patch" in p]
    assert flag["target"]["kind"] == "DaemonSet" and flag["target"]["name"] == "drctl-node-agent"
    assert yaml.safe_load(flag["patch"]) == [
        {"op": "add", "path": "/spec/template/spec/containers/0/command/-", "value": "--allow-fault-injection"}
    ]


# -- rendered -----------------------------------------------------------------------------------------


def test_an_overlay_with_the_component_renders_the_drill_setup(tmp_path: Path) -> None:
    """The overlay docs/deploy.md shows: the base plus the component, as kubectl renders it."""
    kubectl = tool("kubectl")
    overlay = tmp_path / "with-drills"
    overlay.mkdir()
    base_dir = os.path.relpath(DEPLOY, overlay)  # kustomize takes no absolute roots
    overlay_spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base_dir],
        "components": [f"{base_dir}/drills"],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(overlay_spec), encoding="utf-8")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}
    assert ("ClusterRole", "drctl-drills") in docs and ("Role", "drctl-drills") in docs
    assert ("Role", "drctl") in docs, "the base is all there"
    worker = docs[("Deployment", "drctl-worker")]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in worker["containers"]}
    env = {e["name"]: e.get("value") for e in containers["worker"]["env"]}
    assert env["DRCTL_KUBERNETES_FAULT_INJECTION"] == "true" and env["DRCTL_PLATFORM"] == "kubernetes"
    assert "DRCTL_KUBERNETES_FAULT_INJECTION" not in {e["name"] for e in containers["kube-watcher"].get("env", [])}
    assert any(t.get("key") == "drctl.io/drill" for t in worker["tolerations"])
    agent = docs[("DaemonSet", "drctl-node-agent")]["spec"]["template"]["spec"]
    (agent_container,) = agent["containers"]
    assert agent_container["command"][-1] == "--allow-fault-injection"
    assert agent_container["command"][:3] == ["python", "-m", "drctl.detectors.gpu_node_agent"]
    token_mounted(agent, agent_container)
    token_mounted(worker, containers["worker"])

    default = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "drctl-drills" not in default and "--allow-fault-injection" not in default
