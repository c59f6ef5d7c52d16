"""Fencing epochs on Kubernetes: annotations on one ConfigMap, ``drctl-fencing``.

Each model's epoch is the annotation ``epoch.drctl.io/{model}``. A claim reads the ConfigMap and
replaces it with its ``resourceVersion``; the API server refuses (409) a replace based on a stale
read, so two claims can never hand out the same epoch — the claim re-reads and tries again. Fenced
steps read the epoch before they act and are refused when theirs is older. The check and the
change are two API calls, not one transaction: a claim that lands between them is not seen by that
step (the next fenced step of the old runbook is refused); see docs/design.md.

The same ConfigMap keeps each model's highest instance index, ``index.drctl.io/{model}`` (it only
grows), raised before an instance's Deployment is created: reconciliation names new instances past
it, so a new instance never takes the name of a deleted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes.client import CoreV1Api, V1ConfigMap, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from drctl.platforms import errors
from drctl.platforms.coalesce import Coalescer

CONFIGMAP = "drctl-fencing"
PREFIX = "epoch.drctl.io/"
INDEX_PREFIX = "index.drctl.io/"
CLAIM_TRIES = 20
T = TypeVar("T")


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

    def __init__(self, core: CoreV1Api, namespace: str, call: Callable[..., Any]) -> None:
        super().__init__(core, namespace, call)
        self._claims: Coalescer[str, int] = Coalescer(self._claim_together)

    async def epochs(self) -> dict[str, int]:
        return await self._by_model(PREFIX)

    async def _by_model(self, prefix: str) -> dict[str, int]:
        """The annotations ``{prefix}{model}`` as model → number (none while there is no ConfigMap)."""
        found = await self._read()
        annotations = (found.metadata.annotations or {}) if found is not None else {}
        return {k.removeprefix(prefix): int(v) for k, v in annotations.items() if k.startswith(prefix)}

    async def claim(self, model: str) -> int:
        """The model's next epoch. Claims asked for in one turn of the event loop go in one
        read-and-replace of the ConfigMap (:class:`Coalescer`): a zone failover's batch claims
        hundreds side by side, and one at a time they refused each other (409) until some ran out
        of tries."""
        return await self._claims(model)

    async def _claim_together(self, models: list[str]) -> list[int]:
        def next_epochs(annotations: dict[str, str]) -> list[int]:
            epochs = []
            for model in models:  # a model twice gets two epochs, in order
                epoch = int(annotations.get(PREFIX + model, "0")) + 1
                annotations[PREFIX + model] = str(epoch)
                epochs.append(epoch)
            return epochs

        return await self._change(next_epochs, f"claim an epoch for {', '.join(sorted(set(models)))}"[:300])

    async def highest_indexes(self) -> dict[str, int]:
        return await self._by_model(INDEX_PREFIX)

    async def record_index(self, model: str, index: int) -> None:
        """Raise ``model``'s highest instance index to ``index`` (a lower one changes nothing)."""

        def raised(annotations: dict[str, str]) -> int:
            if index > int(annotations.get(INDEX_PREFIX + model, "-1")):
                annotations[INDEX_PREFIX + model] = str(index)
            return index

        await self._change(raised, f"record instance index {index} of {model}")

    async def _change(self, change: Callable[[dict[str, str]], T], what: str) -> T:
        """Apply ``change`` to the ConfigMap's annotations and write them with the read's
        ``resourceVersion``, reading again after a conflict (409); nothing is written when ``change``
        left them as they were. Returns what ``change`` returns."""
        for _ in range(CLAIM_TRIES):
            found = await self._read()
            before = (found.metadata.annotations or {}) if found is not None else {}
            annotations = dict(before)
            result = change(annotations)
            if annotations == before:
                return result
            try:
                if found is None:
                    body = V1ConfigMap(metadata=V1ObjectMeta(name=CONFIGMAP, annotations=annotations))
                    create = self.core.create_namespaced_config_map
                    await self._call("create", "configmaps", create, self.namespace, body)
                else:
                    found.metadata.annotations = annotations
                    replace = self.core.replace_namespaced_config_map
                    await self._call("update", "configmaps", replace, CONFIGMAP, self.namespace, found)
                return result
            except ApiException as exc:
                if exc.status == 409:
                    continue  # another claim or record won (or created it meanwhile): read again
                raise
        raise RuntimeError(f"could not {what} after {CLAIM_TRIES} conflicting tries")

    async def check(self, model: str, epoch: int | None) -> None:
        if epoch is None:
            return
        errors.check_epoch(model, epoch, (await self.epochs()).get(model, 0))
