"""deploy/helm/drctl: `helm lint` passes, the chart's default render is the kustomization's objects
(``kubectl kustomize deploy/kubernetes``) field for field, and the values a platform team sets take
effect: Temporal address and TLS, tokens from Secrets, the node agent's GPU node label, the
ServiceMonitor, another release name and namespace.

helm and kubectl are the official binaries that scripts/install-kube-tools.sh puts beside the venv's
interpreter (``make test`` runs it). The tests look there, then on PATH; without them they skip with
the reason, except under CI on Linux x86-64, where the Makefile installs them and a skip would hide
a broken install.
"""

from __future__ import annotations

import difflib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kube_tools import tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "drctl"
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
RELEASE = "drctl"
NAMESPACE = "drctl"

HELM_LABELS = frozenset(
    {"helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"}
)
"""The labels the chart adds to every object's metadata (never to selectors or pod templates); the
kustomization has none of them."""

CHECKSUMS = frozenset({"checksum/env", "checksum/policy"})
"""Pod-template annotations of the chart's drctl workloads: a changed config or policy rolls the pods."""

DRCTL_WORKLOADS = {
    ("Deployment", "drctl-worker"),
    ("Deployment", "drctl-alert-receiver"),
    ("DaemonSet", "drctl-node-agent"),
}
TEMPORAL_CONTAINERS = {"worker", "kube-watcher", "alert-receiver", "node-agent"}
"""The containers that talk to Temporal (they read the drctl-env ConfigMap): the node agent starts
DrainGpuWorkflow when one of its GPUs turns "drain"."""

Doc = dict[str, Any]
Key = tuple[str, str, str]
"""kind, namespace ('' for cluster-scoped), name."""


# -- the tools -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="module")
def kustomized() -> dict[Key, Doc]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(KUSTOMIZATION)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return by_key(result.stdout)


@pytest.fixture(scope="module")
def kustomized_with_drills(tmp_path_factory: pytest.TempPathFactory) -> dict[Key, Doc]:
    """The base plus the drills component, through an overlay of one's own as docs/deploy.md shows
    (kustomize refuses an overlay inside the base, and takes no absolute roots)."""
    overlay = tmp_path_factory.mktemp("overlays") / "with-drills"
    overlay.mkdir()
    base = os.path.relpath(KUSTOMIZATION, overlay)
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "components": [f"{base}/drills"],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return by_key(result.stdout)


Render = Callable[..., dict[Key, Doc]]


@pytest.fixture(scope="module")
def render(helm: str) -> Render:
    """``render(values, release=..., namespace=..., extra=[...])``: `helm template` of the chart."""

    def _render(
        values: Doc | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE, extra: tuple[str, ...] = ()
    ) -> dict[Key, Doc]:
        result = template(helm, values, release=release, namespace=namespace, extra=extra)
        assert result.returncode == 0, result.stderr
        return by_key(result.stdout)

    return _render


def template(
    helm: str, values: Doc | None, *, release: str = RELEASE, namespace: str = NAMESPACE, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace, "--values", "-", *extra],
        input=yaml.safe_dump(values or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def by_key(stream: str) -> dict[Key, Doc]:
    out: dict[Key, Doc] = {}
    for doc in yaml.safe_load_all(stream):
        if not doc:
            continue
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = doc
    return out


# -- reading objects -------------------------------------------------------------------------------


def one(objects: dict[Key, Doc], kind: str, name: str) -> Doc:
    found = [doc for (k, _, n), doc in objects.items() if (k, n) == (kind, name)]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: {len(found)} containers {name}"
    return found[0]


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts_of(c: Doc) -> dict[str, Doc]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def volumes_of(workload: Doc) -> dict[str, Doc]:
    return {v["name"]: v for v in pod_spec(workload).get("volumes", [])}


def workloads(objects: dict[Key, Doc]) -> Iterator[Doc]:
    return (doc for (kind, _, _), doc in objects.items() if kind in ("Deployment", "DaemonSet"))


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Where two parsed documents differ, as paths; empty when they are equal."""
    if isinstance(want, dict) and isinstance(got, dict):
        return [
            d
            for k in sorted(want.keys() | got.keys(), key=str)
            for d in (
                [f"{path}.{k}: only in the kustomization"]
                if k not in got
                else [f"{path}.{k}: only in the chart"]
                if k not in want
                else differences(want[k], got[k], f"{path}.{k}")
            )
        ]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True)) for d in differences(w, g, f"{path}[{i}]")]
    if want == got:
        return []
    if isinstance(want, str) and isinstance(got, str) and "\n" in want + got:
        lines = difflib.unified_diff(want.splitlines(), got.splitlines(), "kustomization", "chart", lineterm="", n=1)
        return [f"{path}:\n" + "\n".join(lines)]
    return [f"{path}: kustomization {want!r}, chart {got!r}"]


def without_helm_additions(doc: Doc) -> Doc:
    """``doc`` less what a chart adds by design (HELM_LABELS, CHECKSUMS), after checking it is there."""
    doc = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy
    labels = doc["metadata"]["labels"]
    assert HELM_LABELS <= labels.keys(), f"{doc['kind']} {doc['metadata']['name']}: Helm's labels missing"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    for label in HELM_LABELS:
        del labels[label]
    if (doc["kind"], doc["metadata"]["name"]) in DRCTL_WORKLOADS:
        template_meta = doc["spec"]["template"]["metadata"]
        annotations = template_meta.pop("annotations")
        assert annotations.keys() == CHECKSUMS, doc["metadata"]["name"]
        assert all(len(v) == 64 for v in annotations.values()), "sha256 hex digests"
    return doc


# -- lint ------------------------------------------------------------------------------------------


PLATFORM_VALUES: Doc = {
    "temporal": {
        "address": "drctl.a1b2c.tmprl.cloud:7233",
        "namespace": "drctl.a1b2c",
        "tls": {"enabled": True, "secretName": "temporal-client-cert", "caKey": "ca.crt"},
        "apiKey": {"existingSecret": "temporal-cloud", "key": "apikey"},
    },
    "alertReceiver": {"tokens": {"existingSecret": "tenant-tokens", "key": "alertmanager"}},
    "nodeAgent": {
        # null drops the default label: Helm merges maps key by key
        "nodeSelector": {"nvidia.com/gpu.present": None, "cloud.example.com/accelerator": "h100"},
        "faultInjection": {"enabled": True, "existingSecret": "drill-token", "key": "bearer"},
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
    "worker": {
        "metrics": {"enabled": True},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}],
    },
    "drills": {"enabled": True},
}
"""Non-default values a platform team sets: Temporal Cloud over mTLS with an API key, tokens from
their Secrets, another GPU node label, drills (the worker's side and the agents'), the
ServiceMonitor, worker metrics and tolerations."""


@pytest.mark.parametrize("values", [None, PLATFORM_VALUES], ids=["defaults", "platform-values"])
def test_helm_lint_passes(helm: str, values: Doc | None) -> None:
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--values", "-"],
        input=yaml.safe_dump(values or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


# -- the defaults are the kustomization ------------------------------------------------------------


def test_default_render_is_the_kustomization(render: Render, kustomized: dict[Key, Doc]) -> None:
    """Same kinds, names and namespace, and every field of every object equal (labels, selectors,
    RBAC rules and subjects, config, policy, probes, security contexts), but the Namespace, which
    `helm install --create-namespace` makes (namespace.create renders it: next test), Helm's
    labels and the checksum annotations. No ServiceMonitor by default."""
    chart = render()
    namespace_key = ("Namespace", "", NAMESPACE)
    assert namespace_key in kustomized
    assert set(chart) == set(kustomized) - {namespace_key}, (
        f"only in the chart: {sorted(set(chart) - set(kustomized))}; "
        f"only in the kustomization: {sorted(set(kustomized) - set(chart) - {namespace_key})}"
    )
    assert not [k for k in chart if k[0] == "ServiceMonitor"]
    for key, doc in chart.items():
        diff = differences(kustomized[key], without_helm_additions(doc))
        assert not diff, f"{key}:\n  " + "\n  ".join(diff)


def test_drills_enabled_renders_the_kustomization_with_the_drills_component(
    render: Render, kustomized: dict[Key, Doc], kustomized_with_drills: dict[Key, Doc]
) -> None:
    """``drills.enabled=true`` is the overlay of the base and ``deploy/kubernetes/drills``, field for
    field: the drctl-drills Role, ClusterRole and bindings (their rules are held to
    FAULT_PERMISSIONS in test_drill_manifests.py), the worker's opt-in, agents' Service, fault token,
    load URL and toleration, and the node agents' fault endpoints with the same token."""
    chart = render({"drills": {"enabled": True}})
    namespace_key = ("Namespace", "", NAMESPACE)
    assert set(chart) == set(kustomized_with_drills) - {namespace_key}, (
        f"only in the chart: {sorted(set(chart) - set(kustomized_with_drills))}; "
        f"only in the kustomization: {sorted(set(kustomized_with_drills) - set(chart) - {namespace_key})}"
    )
    added = set(kustomized_with_drills) - set(kustomized)
    assert {(kind, name) for kind, _, name in added} == {
        (kind, "drctl-drills") for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    }
    for key, doc in chart.items():
        diff = differences(kustomized_with_drills[key], without_helm_additions(doc))
        assert not diff, f"{key}:\n  " + "\n  ".join(diff)
    # And it changes what the default leaves alone: not a no-op comparison.
    worker = container(one(chart, "Deployment", "drctl-worker"), "worker")
    assert env_of(worker)["DRCTL_KUBERNETES_FAULT_INJECTION"]["value"] == "true"
    assert "DRCTL_KUBERNETES_FAULT_INJECTION" not in env_of(
        container(one(render(), "Deployment", "drctl-worker"), "worker")
    )


def test_drills_without_rbac_create_leave_the_roles_to_the_platform_team(render: Render) -> None:
    chart = render({"drills": {"enabled": True}, "rbac": {"create": False}, "serviceAccount": {"name": "drctl"}})
    assert not [k for k in chart if k[2].endswith("-drills")]
    assert "--allow-fault-injection" in container(one(chart, "DaemonSet", "drctl-node-agent"), "node-agent")["command"]
    tolerations = pod_spec(one(chart, "Deployment", "drctl-worker"))["tolerations"]
    assert {"key": "drctl.io/drill", "operator": "Exists", "effect": "NoExecute"} in tolerations


def test_namespace_create_adds_the_kustomization_namespace(render: Render, kustomized: dict[Key, Doc]) -> None:
    chart = render({"namespace": {"create": True}})
    assert set(chart) == set(kustomized)
    key = ("Namespace", "", NAMESPACE)
    assert not differences(kustomized[key], without_helm_additions(chart[key]))


def test_rbac_defaults_grant_what_the_kustomization_grants(render: Render, kustomized: dict[Key, Doc]) -> None:
    """Spelled out, though the whole-object comparison covers it: the kustomization's RBAC is checked
    against the code's verbs in test_manifests.py, so the chart's is too."""
    chart = render()
    for kind, name in (("Role", "drctl"), ("ClusterRole", "drctl-node-reader")):
        assert one(chart, kind, name)["rules"] == one(kustomized, kind, name)["rules"]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for (k, _, _), binding in chart.items():
            if k == kind:
                assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "drctl", "namespace": NAMESPACE}]


def test_a_new_policy_rolls_the_pods(render: Render) -> None:
    policy = (ROOT / "examples" / "vllm-policy.yaml").read_text(encoding="utf-8")
    default, custom = render(), render({"policy": {"content": policy}})
    assert one(custom, "ConfigMap", "drctl-policy")["data"]["dr-policy.yaml"] == policy
    for kind, name in DRCTL_WORKLOADS:
        before = one(default, kind, name)["spec"]["template"]["metadata"]["annotations"]
        after = one(custom, kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert before["checksum/policy"] != after["checksum/policy"], name
        assert before["checksum/env"] == after["checksum/env"], name


def test_an_existing_policy_configmap_replaces_the_charts(render: Render) -> None:
    chart = render({"policy": {"existingConfigMap": "fleet-policy"}})
    assert not [k for k in chart if k[:1] == ("ConfigMap",) and k[2] == "drctl-policy"]
    for kind, name in DRCTL_WORKLOADS:
        assert volumes_of(one(chart, kind, name))["policy"]["configMap"]["name"] == "fleet-policy"


# -- what a platform team sets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform_render(render: Render) -> dict[Key, Doc]:
    return render(PLATFORM_VALUES)


def test_temporal_address_and_tls_reach_every_temporal_container(platform_render: dict[Key, Doc]) -> None:
    env = one(platform_render, "ConfigMap", "drctl-env")["data"]
    assert env["DRCTL_TEMPORAL_ADDRESS"] == "drctl.a1b2c.tmprl.cloud:7233"
    assert env["DRCTL_TEMPORAL_NAMESPACE"] == "drctl.a1b2c"
    assert env["DRCTL_TEMPORAL_TLS"] == "true"
    files = {env[v] for v in ("DRCTL_TEMPORAL_TLS_CERT", "DRCTL_TEMPORAL_TLS_KEY", "DRCTL_TEMPORAL_TLS_CA")}
    assert {Path(f).name for f in files} == {"tls.crt", "tls.key", "ca.crt"}

    seen = set()
    for workload in workloads(platform_render):
        for c in pod_spec(workload)["containers"]:
            talks_to_temporal = {"configMapRef": {"name": "drctl-env"}} in c.get("envFrom", [])
            assert talks_to_temporal == (c["name"] in TEMPORAL_CONTAINERS), c["name"]
            if not talks_to_temporal:
                assert "temporal-tls" not in mounts_of(c) and "DRCTL_TEMPORAL_API_KEY" not in env_of(c)
                continue
            seen.add(c["name"])
            mount = mounts_of(c)["temporal-tls"]
            assert mount["readOnly"] is True
            assert all(f.startswith(mount["mountPath"].rstrip("/") + "/") for f in files), c["name"]
            assert "subPath" not in mount, "a subPath mount would not see a renewed certificate"
            secret = volumes_of(workload)["temporal-tls"]["secret"]
            assert secret["secretName"] == "temporal-client-cert"
            api_key = env_of(c)["DRCTL_TEMPORAL_API_KEY"]
            assert api_key == {
                "name": "DRCTL_TEMPORAL_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "temporal-cloud", "key": "apikey"}},
            }
    assert seen == TEMPORAL_CONTAINERS


def test_tls_without_a_client_certificate_mounts_nothing(render: Render) -> None:
    chart = render({"temporal": {"tls": {"enabled": True}}})
    env = one(chart, "ConfigMap", "drctl-env")["data"]
    assert env["DRCTL_TEMPORAL_TLS"] == "true"
    assert not {"DRCTL_TEMPORAL_TLS_CERT", "DRCTL_TEMPORAL_TLS_KEY", "DRCTL_TEMPORAL_TLS_CA"} & env.keys()
    for workload in workloads(chart):
        assert "temporal-tls" not in volumes_of(workload)


def test_alert_tokens_come_from_the_given_secret(platform_render: dict[Key, Doc]) -> None:
    receiver = one(platform_render, "Deployment", "drctl-alert-receiver")
    c = container(receiver, "alert-receiver")
    tokens_file = env_of(c)["DRCTL_ALERT_TOKENS_FILE"]["value"]
    assert "DRCTL_ALERT_TOKENS" not in env_of(c), "tokens only from the file"
    mount = mounts_of(c)["alert-tokens"]
    assert mount["readOnly"] is True
    assert tokens_file == mount["mountPath"].rstrip("/") + "/alertmanager"
    assert volumes_of(receiver)["alert-tokens"]["secret"]["secretName"] == "tenant-tokens"
    assert not [k for k in platform_render if k[0] == "Secret"], "the chart never holds a secret"


def test_node_agent_runs_on_the_given_gpu_label_with_fault_injection(platform_render: dict[Key, Doc]) -> None:
    agent = one(platform_render, "DaemonSet", "drctl-node-agent")
    spec = pod_spec(agent)
    assert spec["nodeSelector"] == {"cloud.example.com/accelerator": "h100"}
    c = container(agent, "node-agent")
    assert "--allow-fault-injection" in c["command"]
    token_file = env_of(c)["DRCTL_FAULT_INJECTION_TOKEN_FILE"]["value"]
    mount = mounts_of(c)["fault-token"]
    assert mount["readOnly"] is True and token_file == mount["mountPath"].rstrip("/") + "/bearer"
    assert volumes_of(agent)["fault-token"]["secret"]["secretName"] == "drill-token"
    assert spec["automountServiceAccountToken"] is False


def test_drills_give_the_worker_the_agents_token_and_keep_its_own_tolerations(
    platform_render: dict[Key, Doc],
) -> None:
    worker = one(platform_render, "Deployment", "drctl-worker")
    c = container(worker, "worker")
    assert (
        env_of(c)["DRCTL_FAULT_INJECTION_TOKEN_FILE"]["value"] == mounts_of(c)["fault-token"]["mountPath"] + "/bearer"
    )
    assert volumes_of(worker)["fault-token"]["secret"]["secretName"] == "drill-token"
    assert "fault-token" not in mounts_of(container(worker, "kube-watcher"))
    assert pod_spec(worker)["tolerations"] == [
        {"key": "drctl.io/drill", "operator": "Exists", "effect": "NoExecute"},
        {"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"},
    ]


def test_service_monitor_scrapes_the_metrics_services(platform_render: dict[Key, Doc], render: Render) -> None:
    (monitor,) = [doc for (kind, _, _), doc in platform_render.items() if kind == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = {name: doc for (kind, _, name), doc in platform_render.items() if kind == "Service"}
    selected = {name for name, s in services.items() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])}
    assert selected == {"drctl-alert-receiver", "drctl-node-agent", "drctl-worker"}, "not the model's Service"

    ports = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert ports.keys() == {"http", "metrics", "sdk-metrics"}
    assert all(e["path"] == "/metrics" and e["interval"] == "15s" for e in ports.values())
    jobs = [r for r in ports["sdk-metrics"]["relabelings"] if r.get("targetLabel") == "job"]
    assert [r["replacement"] for r in jobs] == ["drctl-worker-sdk"]
    for name in selected:
        assert {p["name"] for p in services[name]["spec"]["ports"]} & ports.keys(), name

    # Each selected Service's port reaches a container port of the pods it selects, by name.
    for name in selected:
        service = services[name]
        backends = [
            w
            for w in workloads(platform_render)
            if selects({"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(backends) == 1, name
        container_ports = {
            p["name"]: p["containerPort"] for c in pod_spec(backends[0])["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"{name}: {port['targetPort']}"

    worker = container(one(platform_render, "Deployment", "drctl-worker"), "worker")
    env = {k: v.get("value") for k, v in env_of(worker).items()}
    assert env["DRCTL_HOST"] == "0.0.0.0", "metrics on loopback cannot be scraped"
    assert {p["name"]: str(p["containerPort"]) for p in worker["ports"]} == {
        "metrics": env["DRCTL_WORKER_METRICS_PORT"],
        "sdk-metrics": env["DRCTL_WORKER_SDK_METRICS_PORT"],
    }

    # Without worker metrics: the receiver and the agents only, and no worker Service.
    plain = render({"serviceMonitor": {"enabled": True}})
    (monitor,) = [doc for (kind, _, _), doc in plain.items() if kind == "ServiceMonitor"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert ("Service", NAMESPACE, "drctl-worker") not in plain


def unreadable_secret_volumes(objects: dict[Key, Doc]) -> list[str]:
    """Secret volumes whose files the pod's user cannot read. The kubelet writes them owned by root
    (group: the pod's fsGroup when it has one) with mode defaultMode (0644 when unset), so a
    non-root user reads them through the "other" bits, or the group bits with an fsGroup."""
    out = []
    for workload in workloads(objects):
        spec = pod_spec(workload)
        context = spec.get("securityContext", {})
        for volume in spec.get("volumes", []):
            if "secret" not in volume:
                continue
            mode = volume["secret"].get("defaultMode", 0o644)
            readable = bool(mode & 0o004) or (bool(mode & 0o040) and context.get("fsGroup") is not None)
            if context.get("runAsUser", 0) != 0 and not readable:
                out.append(f"{workload['metadata']['name']}: {volume['name']} (mode {mode:o}, no fsGroup)")
    return out


def test_secret_files_are_readable_by_the_pods_user(
    kustomized: dict[Key, Doc], platform_render: dict[Key, Doc], render: Render
) -> None:
    """Tokens and certificates mounted with mode 0440 need the pod's fsGroup, else user 10001 gets
    "permission denied" reading them: in the kustomization, the chart's defaults, and the chart with
    every Secret of PLATFORM_VALUES mounted."""
    secret_volumes = {
        v["name"] for w in workloads(platform_render) for v in pod_spec(w).get("volumes", []) if "secret" in v
    }
    assert secret_volumes == {"alert-tokens", "temporal-tls", "fault-token"}
    for objects in (kustomized, render(), platform_render):
        assert not unreadable_secret_volumes(objects)


def test_another_release_and_namespace_rename_everything(render: Render) -> None:
    """No name or namespace of the defaults is left hard-coded: release "prod" in namespace "gpu-dr"."""
    chart = render(
        {"serviceMonitor": {"enabled": True}, "drills": {"enabled": True}}, release="prod", namespace="gpu-dr"
    )
    assert ("ClusterRole", "", "prod-drctl-drills") in chart and ("Role", "gpu-dr", "prod-drctl-drills") in chart
    for (kind, namespace, name), doc in chart.items():
        if kind in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert namespace == ""
        else:
            assert namespace == "gpu-dr", (kind, name)
        if doc["metadata"]["labels"].get("drctl.io/model") is None:
            assert name.startswith("prod-drctl"), (kind, name)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for (k, _, _), binding in chart.items():
            if k == kind:
                assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prod-drctl", "namespace": "gpu-dr"}]
                assert one(chart, binding["roleRef"]["kind"], binding["roleRef"]["name"])
    for workload in workloads(chart):
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] == "prod-drctl"
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert one(chart, "ConfigMap", volume["configMap"]["name"])
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                assert one(chart, "ConfigMap", source["configMapRef"]["name"])
    watcher = container(one(chart, "Deployment", "prod-drctl-worker"), "kube-watcher")
    assert env_of(watcher)["DRCTL_NODE_AGENT_SERVICE"]["value"] == "prod-drctl-node-agent.gpu-dr.svc:9400"
    drilling = env_of(container(one(chart, "Deployment", "prod-drctl-worker"), "worker"))
    assert drilling["DRCTL_NODE_AGENT_SERVICE"]["value"] == "prod-drctl-node-agent.gpu-dr.svc:9400"
    assert drilling["DRCTL_DRILL_LB_URL"]["value"] == "http://{model}.gpu-dr.svc:8000"
    for (kind, _, name), service in chart.items():
        if kind == "Service":
            pods = [
                w
                for w in workloads(chart)
                if selects({"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
            ]
            assert pods, f"Service {name} selects no pods"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temporal": {"tls": {"secretName": "cert"}}}, "temporal.tls.enabled is false"),
        ({"temporal": {"tls": {"enabled": True, "caKey": "ca.crt"}}}, "temporal.tls.secretName, which is empty"),
        (
            {"nodeAgent": {"faultInjection": {"enabled": True, "existingSecret": ""}}},
            "nodeAgent.faultInjection.existingSecret is required",
        ),
        ({"alertReceiver": {"tokens": {"existingSecret": ""}}}, "alertReceiver.tokens.existingSecret is required"),
        (
            {"drills": {"enabled": True}, "nodeAgent": {"faultInjection": {"existingSecret": ""}}},
            "nodeAgent.faultInjection.existingSecret is required",
        ),
        ({"drills": {"enabled": True, "loadUrl": "http://lb:8000"}}, "/drills/loadUrl"),
        ({"temporal": {"address": "no-port"}}, "/temporal/address"),
        ({"temporal": {"tls": {"enabled": "yes"}}}, "/temporal/tls/enabled"),
        ({"workr": {"replicas": 1}}, "workr"),
        ({"extraConfig": {"TEMPORAL_ADDRESS": "x:1"}}, "^DRCTL_"),
    ],
    ids=[
        "cert-without-tls",
        "ca-without-cert",
        "faults-without-token",
        "no-tokens",
        "drills-without-token",
        "load-url-without-model",
        "address",
        "bool",
        "typo",
        "not-drctl",
    ],
)
def test_wrong_values_are_refused_with_the_reason(helm: str, values: Doc, message: str) -> None:
    result = template(helm, values)
    assert result.returncode != 0, f"rendered: {values}"
    assert message in result.stderr, result.stderr
