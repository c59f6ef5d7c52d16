"""Cordoned GPUs on Kubernetes: one ConfigMap, ``drctl-cordoned-gpus``, in drctl's own namespace.

Its ``data["cordoned.json"]`` maps each cordoned GPU (``node/index``, as the policy's pool names
it) to why it was cordoned. A change reads the ConfigMap and replaces it with its
``resourceVersion``; the API server refuses (409) a replace based on a stale read, so two workers
cordoning at once never lose each other's GPU — the change re-reads and tries again. The record is
in the cluster, so a worker restarted (or another replica) knows every cordon.

Why a ConfigMap and not a node label, taint or annotation (the three that were considered):

- **Writing Nodes needs cluster-wide rights.** Nodes are cluster-scoped: a label, taint or
  annotation means ``patch`` on every node of the cluster, for a worker whose Role is otherwise
  confined to its namespace (``deploy/kubernetes/rbac.yaml`` grants nodes read-only, and
  ``tests/deploy`` holds it there). A worker that can patch Nodes can taint any node and steer or
  evict anyone's workloads. A ConfigMap in drctl's namespace needs only the verbs the fencing
  epochs already hold (``configmaps`` get/create/update).
- **A taint has the wrong grain.** drctl cordons one GPU of a node; a taint keeps pods off the whole
  node (eight GPUs), and ``NoExecute`` would evict the healthy instances on its other GPUs.
- **A label cannot say it.** A label value has no ``/`` and at most 63 characters: neither a GPU
  list nor the reason fits, and one label per GPU grows the node's label set, which every
  scheduler and watcher of the cluster reads.
- **A Node object comes and goes with the machine.** A node replaced by the autoscaler or
  re-registered after repair is a new object without the annotation: the cordon would be lost
  exactly when a failed zone comes back, before anyone decided to fail back.

drctl's own placement is what honours a cordon (it chooses the GPU and pins the pod with a
``nodeSelector``), so nothing outside drctl needs to see it; ``kubectl -n drctl get configmap
drctl-cordoned-gpus -o yaml`` shows it to a person.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client import V1ConfigMap, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from drctl.platforms.kubernetes.fencing import ConfigMapRecord

CONFIGMAP = "drctl-cordoned-gpus"
KEY = "cordoned.json"
CHANGE_TRIES = 20


def _parse(found: Any | None) -> dict[str, str]:
    if found is None:
        return {}
    try:
        data = json.loads((found.data or {}).get(KEY) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


class KubernetesCordons(ConfigMapRecord):
    configmap = CONFIGMAP

    async def cordoned(self) -> dict[str, str]:
        """Every cordoned GPU and why."""
        return _parse(await self._read())

    async def change(self, gpu: str, reason: str | None) -> tuple[bool, str | None]:
        """Cordon ``gpu`` for ``reason`` (None: uncordon it). Returns whether the record changed,
        and the reason recorded before (None: it was not cordoned)."""
        for _ in range(CHANGE_TRIES):
            found = await self._read()
            cordoned = _parse(found)
            before = cordoned.get(gpu)
            if (reason is None and before is None) or (reason is not None and before is not None):
                return False, before  # as wanted already (a cordon keeps its first reason)
            if reason is None:
                cordoned.pop(gpu)
            else:
                cordoned[gpu] = reason
            text = json.dumps(cordoned, sort_keys=True)
            try:
                if found is None:
                    body = V1ConfigMap(metadata=V1ObjectMeta(name=CONFIGMAP), data={KEY: text})
                    create = self.core.create_namespaced_config_map
                    await self._call("create", "configmaps", create, self.namespace, body)
                else:
                    found.data = {**(found.data or {}), KEY: text}
                    replace = self.core.replace_namespaced_config_map
                    await self._call("update", "configmaps", replace, CONFIGMAP, self.namespace, found)
                return True, before
            except ApiException as exc:
                if exc.status == 409:
                    continue  # another worker changed (or created) it meanwhile: read again
                raise
        raise RuntimeError(f"could not record the cordon of {gpu} after {CHANGE_TRIES} conflicting tries")
