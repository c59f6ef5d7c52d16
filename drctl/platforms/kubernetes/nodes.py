"""Which Nodes cannot take a new instance now, judged from the Node objects themselves.

Placement keeps a GPU out when drctl cordoned it (:mod:`.cordons`) or a node agent wants it drained;
on a cluster it must also keep out the GPUs of a Node the cluster itself has closed: one that is
``NotReady`` (its ``Ready`` condition ``False`` or ``Unknown``), cordoned (``spec.unschedulable``,
``kubectl cordon``/``drain``, a node-down drill), or tainted ``NoExecute`` or ``NoSchedule`` with a
taint the instance pods do not tolerate (they tolerate only ``nvidia.com/gpu:NoSchedule``,
:data:`.templates.TOLERATIONS`). A pod pinned there (placement pins it with a ``nodeSelector``)
would stay Pending, or be evicted, and the standby would only look placed.

This is the Node's state, not drctl's decision, so it is read every time and never written into the
``drctl-cordoned-gpus`` ConfigMap: when the Node is Ready and schedulable again its GPUs return to
placement without anyone uncordoning them. A Node that has no ``Ready`` condition yet is no
evidence of anything (as in the watcher), and a policy node with no Node object is not judged here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CLOSING_EFFECTS = ("NoExecute", "NoSchedule")
"""Taint effects that keep a new pod off a node (``PreferNoSchedule`` only discourages it)."""


def tolerates(toleration: Mapping[str, Any], taint: Any) -> bool:
    """Kubernetes' rule: the effect matches (or the toleration names none), and the key matches
    (an empty key with ``Exists`` matches every key) with ``Exists`` or an equal value."""
    effect = toleration.get("effect")
    if effect and effect != taint.effect:
        return False
    operator = toleration.get("operator") or "Equal"
    key = toleration.get("key") or ""
    if not key:
        return operator == "Exists"
    if key != taint.key:
        return False
    return operator == "Exists" or (toleration.get("value") or "") == (taint.value or "")


def unavailable(node: Any, tolerations: Iterable[Mapping[str, Any]]) -> str | None:
    """Why a new instance pod cannot run on ``node`` (a ``V1Node``) now; None when it can."""
    reasons = []
    conditions = (node.status.conditions if node.status else None) or []
    for condition in conditions:
        if condition.type == "Ready" and condition.status != "True":
            why = f" ({condition.reason})" if condition.reason else ""
            reasons.append(f"NotReady{why}")
    spec = node.spec
    if spec is not None and spec.unschedulable:
        reasons.append("cordoned (unschedulable)")
    tolerations = list(tolerations)
    for taint in (spec.taints if spec is not None else None) or []:
        if taint.effect in CLOSING_EFFECTS and not any(tolerates(t, taint) for t in tolerations):
            value = f"={taint.value}" if taint.value else ""
            reasons.append(f"tainted {taint.key}{value}:{taint.effect}")
    return ", ".join(reasons) or None
