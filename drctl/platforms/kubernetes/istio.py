"""Optional Istio mode: failover shifts weight in a ``VirtualService`` (seed §3.2), failback shifts it back.

The VirtualService routes a model to two destinations: the primary Service (host ``{model}``) and
the standby Service (host ``{model}-standby``), at whatever weights the operator wrote (100/0, or
the seed's 90/10). When a standby is registered as the new primary, ``shift`` writes 0/100. The
hosts are templates (``DRCTL_KUBERNETES_ISTIO_PRIMARY_HOST`` / ``_STANDBY_HOST``). A model that has no
route to both of its hosts in the VirtualService is not routed by it: ``shift`` logs that and writes
nothing ("nothing to shift"), and the failover goes on with the label flip as its only routing.

**Failback restores the operator's weights, not 100/0.** The DR policy has no traffic section, so
the split the VirtualService had before drctl first touched a model's route *is* the policy. The
first shift of a model records it in the annotation ``drctl.io/weights-before-failover`` on the
VirtualService itself (JSON: model → the weights of each of its routes, in order), in the same
patch as the new weights: a worker restarted between failover and failback, or another replica,
finds it there. A later shift of a model already recorded keeps the first record (the weights
before the *first* failover are the ones to return to). ``restore`` (a zone failback, an
uncordoned GPU: the platform calls it from ``uncordon_gpu``) writes every recorded model's weights
back and drops their entries (the annotation goes with the last one). A model whose route was
removed meanwhile is dropped with nothing written; one whose routes were added or removed
(a different count) is refused, non-retryable, for a person to settle: set the weights, then
remove the model's entry from the annotation.

Every write is a read-modify-write of ``spec.http`` (and the annotation) carrying the
resourceVersion (a 409 is re-read and retried), and is skipped when nothing would change, so a
retried activity patches nothing.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

log = logging.getLogger(__name__)

GROUP = "networking.istio.io"
VERSION = "v1beta1"
PLURAL = "virtualservices"
MERGE_PATCH = "application/merge-patch+json"
ROUTE_CHANGED = "IstioRouteChanged"
ORIGINAL_WEIGHTS = "drctl.io/weights-before-failover"
"""Annotation on the VirtualService: ``{model: [{host: weight, ...}, ...]}``, per route of the
model (in ``spec.http`` order) the weights before drctl first shifted it; failback writes them back."""

Weights = dict[str, int]
"""Short host (``llama``, not ``llama.fleet.svc.cluster.local``) → weight."""

Call = Callable[..., Awaitable[Any]]
"""``KubernetesPlatform._call``: (verb, resource, fn, *args, **kwargs), retries 429/5xx, 403 final."""


def _short(host: str) -> str:
    """``llama.fleet.svc.cluster.local`` → ``llama`` (a VirtualService may name either)."""
    return host.split(".", 1)[0]


def _host(destination: dict[str, Any]) -> str:
    return _short(destination.get("destination", {}).get("host", ""))


def _routes(http: list[dict[str, Any]], hosts: Iterable[str]) -> list[list[dict[str, Any]]]:
    """The destinations of every route that sends to all of ``hosts`` (the objects themselves)."""
    wanted = set(hosts)
    out = []
    for route in http:
        destinations = route.get("route") or []
        if wanted <= {_host(d) for d in destinations}:
            out.append(destinations)
    return out


def _reweigh(routes: list[list[dict[str, Any]]], weights: list[Weights]) -> bool:
    changed = False
    for destinations, want in zip(routes, weights, strict=True):
        for d in destinations:
            weight = want.get(_host(d))
            if weight is not None and d.get("weight") != weight:
                d["weight"] = weight
                changed = True
    return changed


def route_weights(http: list[dict[str, Any]], hosts: Iterable[str]) -> list[Weights]:
    """Per route that sends to all of ``hosts``, the weights of those hosts (an omitted weight is 0,
    as Istio reads it on a route with several destinations)."""
    wanted = set(hosts)
    return [
        {_host(d): int(d.get("weight") or 0) for d in destinations if _host(d) in wanted}
        for destinations in _routes(http, wanted)
    ]


def with_weights(http: list[dict[str, Any]], weights: Weights) -> list[dict[str, Any]] | None:
    """``spec.http`` with every route that sends to all of ``weights``' hosts reweighted, or None
    when nothing changes. Raises LookupError when no route has both destinations."""
    out = copy.deepcopy(http)
    routes = _routes(out, weights)
    if not routes:
        raise LookupError(f"no http route with destinations {sorted(weights)}")
    return out if _reweigh(routes, [weights] * len(routes)) else None


def with_route_weights(http: list[dict[str, Any]], weights: list[Weights]) -> list[dict[str, Any]] | None:
    """``spec.http`` with the routes that send to all of the hosts in ``weights`` given each its own
    weights, in order; None when nothing changes. LookupError: no such route any more; ValueError:
    not as many such routes as ``weights`` has entries."""
    hosts = {h for w in weights for h in w}
    out = copy.deepcopy(http)
    routes = _routes(out, hosts)
    if not routes:
        raise LookupError(f"no http route with destinations {sorted(hosts)}")
    if len(routes) != len(weights):
        raise ValueError(f"{len(routes)} http route(s) with destinations {sorted(hosts)}, {len(weights)} recorded")
    return out if _reweigh(routes, weights) else None


def recorded(vs: dict[str, Any]) -> dict[str, list[Weights]]:
    """The weights ``ORIGINAL_WEIGHTS`` records, per model (entries that do not parse are left out)."""
    raw = (vs.get("metadata", {}).get("annotations") or {}).get(ORIGINAL_WEIGHTS)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    out: dict[str, list[Weights]] = {}
    for model, routes in data.items() if isinstance(data, dict) else []:
        if isinstance(routes, list) and routes and all(_is_weights(r) for r in routes):
            out[str(model)] = [{str(h): int(w) for h, w in r.items()} for r in routes]
    return out


def _is_weights(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(w, int) and not isinstance(w, bool) for w in value.values())
    )


def _shown(weights: list[Weights]) -> str:
    return ", ".join("/".join(str(w) for w in route.values()) for route in weights)


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

    def weights(self, model: str, *, to_standby: bool) -> Weights:
        primary, standby = self.primary_host.format(model=model), self.standby_host.format(model=model)
        return {primary: 0, standby: 100} if to_standby else {primary: 100, standby: 0}

    async def _read(self) -> dict[str, Any]:
        vs: dict[str, Any] = await self.call(
            "get",
            f"{PLURAL}.{GROUP}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
        )
        return vs

    async def _patch(
        self, vs: dict[str, Any], http: list[dict[str, Any]] | None, record: dict[str, str | None] | None
    ) -> bool:
        """Write ``http`` (None: unchanged) and the record (``{ORIGINAL_WEIGHTS: JSON text}``, or
        ``{ORIGINAL_WEIGHTS: None}`` to remove it; None: unchanged), conditional on the
        resourceVersion read; False on a 409."""
        metadata: dict[str, Any] = {}
        if vs.get("metadata", {}).get("resourceVersion"):
            metadata["resourceVersion"] = vs["metadata"]["resourceVersion"]
        if record is not None:
            metadata["annotations"] = record
        body: dict[str, Any] = {"metadata": metadata}
        if http is not None:
            body["spec"] = {"http": http}
        try:
            await self.call(
                "patch",
                f"{PLURAL}.{GROUP}",
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body,
                _content_type=MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def shift(self, model: str, *, to_standby: bool) -> str:
        """Send all of the model's traffic to the standby (or back to the primary) destination. The
        first shift to the standby records the weights it replaces (``ORIGINAL_WEIGHTS``)."""
        weights = self.weights(model, to_standby=to_standby)
        shown = "/".join(str(w) for w in weights.values())
        for _ in range(self.attempts):
            vs = await self._read()
            http = vs.get("spec", {}).get("http") or []
            try:
                new = with_weights(http, weights)
            except LookupError as exc:
                # Not routed through this VirtualService: the model's Service (the label flip
                # already made) is its only routing, so there is no weight to shift. Failing here
                # would fail the failover after the new instance was labelled serving.
                detail = f"VirtualService {self.name}: {exc}; nothing to shift for {model}"
                log.warning("%s", detail)
                return detail
            if new is None:
                return f"VirtualService {self.name} already at {shown}"
            records = recorded(vs)
            record: dict[str, str | None] | None = None
            if to_standby and model not in records:
                records[model] = route_weights(http, {_short(h) for h in weights})
                record = {ORIGINAL_WEIGHTS: json.dumps(records, sort_keys=True)}
            if await self._patch(vs, new, record):
                was = f" (was {_shown(records[model])}, recorded for failback)" if record is not None else ""
                return f"VirtualService {self.name} weights {shown}{was}"
        raise RuntimeError(f"VirtualService {self.name}: {self.attempts} conflicting writes in a row")  # retryable

    async def restore(self) -> str:
        """Failback: every model's weights as recorded before its first shift, and its record
        dropped. Idempotent: with nothing recorded, nothing is written."""
        for _ in range(self.attempts):
            vs = await self._read()
            records = recorded(vs)
            annotated = ORIGINAL_WEIGHTS in (vs.get("metadata", {}).get("annotations") or {})
            if not records and not annotated:
                return f"VirtualService {self.name}: no shifted weights to restore"
            http: list[dict[str, Any]] = vs.get("spec", {}).get("http") or []
            changed = False
            done = []
            for model, weights in sorted(records.items()):
                try:
                    new = with_route_weights(http, weights)
                except LookupError:
                    done.append(f"{model}: route gone, nothing to restore")
                    continue
                except ValueError as exc:
                    raise ApplicationError(
                        f"VirtualService {self.name!r}, {model}: {exc} before failover; set its weights by hand,"
                        f" then remove {model!r} from the annotation {ORIGINAL_WEIGHTS}",
                        type=ROUTE_CHANGED,
                        non_retryable=True,
                    ) from exc
                if new is not None:
                    http, changed = new, True
                done.append(f"{model} back to {_shown(weights)}")
            if await self._patch(vs, http if changed else None, {ORIGINAL_WEIGHTS: None}):
                return f"VirtualService {self.name}: " + ("; ".join(done) or "dropped an unreadable record")
        raise RuntimeError(f"VirtualService {self.name}: {self.attempts} conflicting writes in a row")  # retryable
