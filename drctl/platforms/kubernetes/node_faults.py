"""A Kubernetes Node taken down for a drill, and brought back: cordoned, tainted ``NoExecute`` and
marked NotReady, each part recorded in the drill's :class:`~drctl.payloads.NodeFault` before it is
written, and undone only where restore finds it in place.

Why all three. The watcher (:mod:`drctl.detectors.kube_watcher`) judges a node, and a zone, from
the Node's ``Ready`` condition: NotReady is what makes the detectors see the node down (its serving
and hot pods fail, its zone counts it down). But on a real cluster the kubelet posts ``Ready=True``
again at its next status update (``nodeStatusUpdateFrequency``, 10 s by default): there the
NotReady part is short. The taint is what lasts: the taint manager evicts every pod on the node
that does not tolerate ``drctl.io/drill`` — the model pods (the watcher sees them deleted) and the
node agent's DaemonSet pod, so the agents' second opinion on the node goes silent too. The cordon
keeps new pods off it and shows in ``kubectl get nodes`` (SchedulingDisabled).

Writes are merge patches that carry the ``resourceVersion`` read, so a kubelet or controller
writing the same Node in between gets a 409 here, and the Node is read again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from drctl.payloads import NodeFault

TAINT_KEY = "drctl.io/drill"
TAINT = {"key": TAINT_KEY, "value": "node-down", "effect": "NoExecute"}
"""The drill's taint; the worker's pods tolerate it (``deploy/kubernetes/drills``), nothing else does."""
REASON = "DrctlDrill"
"""The reason of the ``Ready`` condition a drill writes: restore puts back only a condition it wrote."""
MERGE_PATCH = "application/merge-patch+json"
ATTEMPTS = 5

Call = Callable[..., Awaitable[Any]]
"""``KubernetesPlatform._call``: (verb, resource, client method, *args, **kwargs), retried on 429/5xx."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_drill_taint(taint: dict[str, Any]) -> bool:
    return taint.get("key") == TAINT_KEY and taint.get("effect") == "NoExecute"


def _ready(conditions: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == "Ready"), None)


class NodeFaults:
    """Cordon, taint and NotReady on Nodes, through the platform's API calls (``call``)."""

    def __init__(self, core: Any, call: Call) -> None:
        self.core = core
        self.call = call

    async def _read(self, name: str) -> dict[str, Any] | None:
        """The Node as the API sent it (its JSON, not the client's model: a condition put back on
        restore is byte for byte the one read, timestamps included); None when there is none."""
        try:
            response = await self.call("get", "nodes", self.core.read_node, name, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw: dict[str, Any] = json.loads(response.data)
        return raw

    async def _write(self, verb_fn: Any, resource: str, name: str, body: dict[str, Any]) -> bool:
        """One compare-and-set merge patch; False on a 409 (read again and retry)."""
        try:
            await self.call("patch", resource, verb_fn, name, body, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def take_down(self, name: str, fault: NodeFault, why: str) -> str:
        """Cordon and taint the Node (one write), then mark it NotReady (its status); says what it did."""
        done: list[str] = []
        for _ in range(ATTEMPTS):
            node = await self._read(name)
            if node is None:
                raise RuntimeError(f"there is no Node {name}")
            spec = node.get("spec") or {}
            taints: list[dict[str, Any]] = list(spec.get("taints") or [])
            change: dict[str, Any] = {}
            if not spec.get("unschedulable"):
                fault.cordoned = True  # recorded before the write: restore finds it in place or not
                change["unschedulable"] = True
            if not any(_is_drill_taint(t) for t in taints):
                fault.tainted = True
                change["taints"] = [*taints, {**TAINT, "timeAdded": _now()}]
            if not change:
                break
            version = node["metadata"].get("resourceVersion")
            body = {"metadata": {"resourceVersion": version}, "spec": change}
            if await self._write(self.core.patch_node, "nodes", name, body):
                if "unschedulable" in change:
                    done.append("cordoned")
                if "taints" in change:
                    done.append(f"tainted {TAINT_KEY}:NoExecute")
                break
        else:
            raise RuntimeError(f"Node {name} kept changing under the cordon and taint ({ATTEMPTS} conflicts)")
        for _ in range(ATTEMPTS):
            node = await self._read(name)
            if node is None:
                raise RuntimeError(f"Node {name} went away while being taken down")
            conditions: list[dict[str, Any]] = list((node.get("status") or {}).get("conditions") or [])
            ready = _ready(conditions)
            if ready is not None and ready.get("reason") == REASON:
                break  # NotReady by a drill already (this one, retried)
            fault.not_ready = True
            fault.previous_ready = {k: str(v) for k, v in ready.items() if v is not None} if ready else None
            now = _now()
            mine = {
                "type": "Ready",
                "status": "False",
                "reason": REASON,
                "message": why[:500],
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            version = node["metadata"].get("resourceVersion")
            body = {
                "metadata": {"resourceVersion": version},
                "status": {"conditions": [*(c for c in conditions if c.get("type") != "Ready"), mine]},
            }
            if await self._write(self.core.patch_node_status, "nodes/status", name, body):
                done.append("marked NotReady")
                break
        else:
            raise RuntimeError(f"Node {name} kept changing under the NotReady status ({ATTEMPTS} conflicts)")
        return f"{name}: {', '.join(done) or 'down already'}"

    async def bring_back(self, fault: NodeFault) -> str:
        """Undo what ``fault`` records, in reverse: the drill's Ready condition replaced by the one
        before it, then the taint removed and the Node uncordoned. Idempotent; a part not in place
        (never written, or undone already, or by someone else) is left alone."""
        name = fault.node
        undone: list[str] = []
        for _ in range(ATTEMPTS):
            node = await self._read(name)
            if node is None:
                return f"{name}: the Node is gone, nothing to restore"
            conditions = list((node.get("status") or {}).get("conditions") or [])
            ready = _ready(conditions)
            if not fault.not_ready or ready is None or ready.get("reason") != REASON:
                break
            others = [c for c in conditions if c.get("type") != "Ready"]
            before = [fault.previous_ready] if fault.previous_ready else []
            body = {
                "metadata": {"resourceVersion": node["metadata"].get("resourceVersion")},
                "status": {"conditions": [*others, *before]},
            }
            if await self._write(self.core.patch_node_status, "nodes/status", name, body):
                undone.append("Ready condition put back")
                break
        else:
            raise RuntimeError(f"Node {name} kept changing while its Ready condition was put back")
        for _ in range(ATTEMPTS):
            node = await self._read(name)
            if node is None:
                return f"{name}: the Node is gone, nothing more to restore"
            spec = node.get("spec") or {}
            taints = list(spec.get("taints") or [])
            change: dict[str, Any] = {}
            if fault.tainted and any(_is_drill_taint(t) for t in taints):
                change["taints"] = [t for t in taints if not _is_drill_taint(t)] or None
            if fault.cordoned and spec.get("unschedulable"):
                change["unschedulable"] = None  # merge patch: removed, i.e. schedulable
            if not change:
                break
            body = {"metadata": {"resourceVersion": node["metadata"].get("resourceVersion")}, "spec": change}
            if await self._write(self.core.patch_node, "nodes", name, body):
                if "taints" in change:
                    undone.append("taint removed")
                if "unschedulable" in change:
                    undone.append("uncordoned")
                break
        else:
            raise RuntimeError(f"Node {name} kept changing while it was uncordoned")
        return f"{name}: {', '.join(undone) if undone else 'nothing of the drill left on it'}"
