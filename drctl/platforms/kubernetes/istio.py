"""Optional Istio mode: failover shifts weight in a ``VirtualService`` (seed §3.2).

The VirtualService routes a model to two destinations: the primary Service (host ``{model}``) and
the standby Service (host ``{model}-standby``), at weights 100/0 while the primary serves. When a
standby is registered as the new primary, ``shift`` writes 0/100. The patch is a read-modify-write
of ``spec.http`` carrying the resourceVersion (a 409 is re-read and retried), and is skipped when
the weights are already as wanted, so a retried activity patches nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

GROUP = "networking.istio.io"
VERSION = "v1beta1"
PLURAL = "virtualservices"
MERGE_PATCH = "application/merge-patch+json"
NO_ROUTE = "IstioRouteNotFound"

Call = Callable[..., Awaitable[Any]]
"""``KubernetesPlatform._call``: (verb, resource, fn, *args, **kwargs), retries 429/5xx, 403 final."""


def _short(host: str) -> str:
    """``llama.fleet.svc.cluster.local`` → ``llama`` (a VirtualService may name either)."""
    return host.split(".", 1)[0]


def with_weights(http: list[dict[str, Any]], weights: dict[str, int]) -> list[dict[str, Any]] | None:
    """``spec.http`` with every route that sends to all of ``weights``' hosts reweighted, or None
    when nothing changes. Raises LookupError when no route has both destinations."""
    out = copy.deepcopy(http)
    found = changed = False
    for route in out:
        destinations = route.get("route") or []
        hosts = {_short(d.get("destination", {}).get("host", "")) for d in destinations}
        if not set(weights) <= hosts:
            continue
        found = True
        for d in destinations:
            want = weights.get(_short(d.get("destination", {}).get("host", "")))
            if want is not None and d.get("weight") != want:
                d["weight"] = want
                changed = True
    if not found:
        raise LookupError(f"no http route with destinations {sorted(weights)}")
    return out if changed else None


class IstioRouting:
    def __init__(
        self,
        custom: CustomObjectsApi,
        call: Call,
        namespace: str,
        virtual_service: str,
        *,
        primary_host: str = "{model}",
        standby_host: str = "{model}-standby",
        attempts: int = 5,
    ) -> None:
        self.custom = custom
        self.call = call
        self.namespace = namespace
        self.name = virtual_service
        self.primary_host = primary_host
        self.standby_host = standby_host
        self.attempts = attempts

    def weights(self, model: str, *, to_standby: bool) -> dict[str, int]:
        primary, standby = self.primary_host.format(model=model), self.standby_host.format(model=model)
        return {primary: 0, standby: 100} if to_standby else {primary: 100, standby: 0}

    async def shift(self, model: str, *, to_standby: bool) -> str:
        """Send all of the model's traffic to the standby (or back to the primary) destination."""
        weights = self.weights(model, to_standby=to_standby)
        shown = "/".join(str(w) for w in weights.values())
        resource = f"{PLURAL}.{GROUP}"
        for attempt in range(self.attempts):
            vs: Any = await self.call(
                "get",
                resource,
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
            )
            try:
                http = with_weights(vs.get("spec", {}).get("http") or [], weights)
            except LookupError as exc:
                raise ApplicationError(
                    f"VirtualService {self.name!r}: {exc}", type=NO_ROUTE, non_retryable=True
                ) from exc
            if http is None:
                return f"VirtualService {self.name} already at {shown}"
            metadata = (
                {"resourceVersion": vs["metadata"]["resourceVersion"]}
                if vs.get("metadata", {}).get("resourceVersion")
                else {}
            )
            try:
                await self.call(
                    "patch",
                    resource,
                    self.custom.patch_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    {"metadata": metadata, "spec": {"http": http}},
                    _content_type=MERGE_PATCH,
                )
                return f"VirtualService {self.name} weights {shown}"
            except ApiException as exc:
                if exc.status != 409 or attempt == self.attempts - 1:
                    raise
        raise AssertionError("unreachable")
