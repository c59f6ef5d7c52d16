"""Fencing epochs on Kubernetes: annotations on one ConfigMap, ``drctl-fencing``.

Each model's epoch is the annotation ``epoch.drctl.io/{model}``. A claim reads the ConfigMap and
replaces it with its ``resourceVersion``; the API server refuses (409) a replace based on a stale
read, so two claims can never hand out the same epoch — the claim re-reads and tries again. Fenced
steps read the epoch before they act and are refused when theirs is older. The check and the
change are two API calls, not one transaction: a claim that lands between them is not seen by that
step (the next fenced step of the old runbook is refused); see docs/design.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes.client import CoreV1Api, V1ConfigMap, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from drctl.platforms import errors

CONFIGMAP = "drctl-fencing"
PREFIX = "epoch.drctl.io/"
CLAIM_TRIES = 20


class ConfigMapRecord:
    """State drctl keeps in one ConfigMap of its namespace (``configmap``): read through the
    platform's API call wrapper, None while the ConfigMap does not exist yet."""

    configmap = CONFIGMAP

    def __init__(self, core: CoreV1Api, namespace: str, call: Callable[..., Any]) -> None:
        self.core = core
        self.namespace = namespace
        self._call = call
        """The platform's API call wrapper (thread, backoff on 429/5xx, 403 made final)."""

    async def _read(self) -> Any | None:
        try:
            read = self.core.read_namespaced_config_map
            return await self._call("get", "configmaps", read, self.configmap, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


class KubernetesFencing(ConfigMapRecord):
    configmap = CONFIGMAP

    async def epochs(self) -> dict[str, int]:
        found = await self._read()
        annotations = (found.metadata.annotations or {}) if found is not None else {}
        return {k.removeprefix(PREFIX): int(v) for k, v in annotations.items() if k.startswith(PREFIX)}

    async def claim(self, model: str) -> int:
        for _ in range(CLAIM_TRIES):
            found = await self._read()
            if found is None:
                body = V1ConfigMap(metadata=V1ObjectMeta(name=CONFIGMAP, annotations={PREFIX + model: "1"}))
                try:
                    create = self.core.create_namespaced_config_map
                    await self._call("create", "configmaps", create, self.namespace, body)
                    return 1
                except ApiException as exc:
                    if exc.status == 409:
                        continue  # created by another claim meanwhile: read it
                    raise
            annotations = dict(found.metadata.annotations or {})
            epoch = int(annotations.get(PREFIX + model, "0")) + 1
            annotations[PREFIX + model] = str(epoch)
            found.metadata.annotations = annotations
            try:
                await self._call(
                    "update", "configmaps", self.core.replace_namespaced_config_map, CONFIGMAP, self.namespace, found
                )
                return epoch
            except ApiException as exc:
                if exc.status == 409:
                    continue  # another claim won: read again
                raise
        raise RuntimeError(f"could not claim an epoch for {model} after {CLAIM_TRIES} conflicting tries")

    async def check(self, model: str, epoch: int | None) -> None:
        if epoch is None:
            return
        errors.check_epoch(model, epoch, (await self.epochs()).get(model, 0))
