"""Envoy as the local data plane: the bootstrap, the per-model EDS files, and reading host health back.

Every model gets one Envoy cluster. Its endpoints come from ``{eds_dir}/{model}.yaml`` (a
``DiscoveryResponse`` that Envoy watches on disk), grouped by load-balancer priority: 0 holds the
serving instances, 1 the hot standbys. Envoy sends traffic to priority 1 only when priority 0 is
(partly) unhealthy: with the default overprovisioning factor 1.4, in proportion once fewer than
~72 % of the serving hosts are healthy. A retry after a failed priority-0 attempt goes to priority 1
(``previous_priorities``), so a client sees no error while a serving instance dies. A failover then
rewrites the EDS file so the promoted standby sits at priority 0; Envoy keeps the health of a host
whose address it already knows, so the promoted host stays routable through the move.

The EDS file is always replaced atomically (``os.replace`` of a fsynced temporary file in the same
folder); Envoy watches the folder (``watched_directory``) and re-reads the file on the rename.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from drctl.policies.schema import DRPolicy, LoadBalancerPolicy
from drctl.settings import LOOPBACK

CONNECT_TIMEOUT = timedelta(milliseconds=250)
"""Upstream connect timeout; every model instance is on the loopback, so a refused or hung connect
is known to be dead quickly."""

MAX_CONCURRENT_RETRIES = 1024
"""Retry circuit breaker of each cluster, as high as Envoy's default limit of concurrent requests."""

MAX_DOWNSTREAM_CONNECTIONS = 10_000
"""Client connections Envoy accepts at once, over all listeners."""

MODEL_HEADER = "model-name"
"""Request header that selects the model on any path."""

SERVING_PRIORITY = 0
STANDBY_PRIORITY = 1

_CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_PREVIOUS_HOSTS_TYPE = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_PREVIOUS_PRIORITIES_TYPE = (
    "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
)
_DOWNSTREAM_CONNECTIONS_TYPE = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_METADATA_NAMESPACE = "drctl"

_FAILURE_FLAGS = (
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_active_degraded_check",
    "pending_dynamic_removal",
    "pending_active_hc",
    "excluded_via_immediate_hc_fail",
    "active_hc_timeout",
)
"""Boolean fields of Envoy's ``HostHealthStatus``; any of them set means the host takes no traffic
(or, for ``pending_dynamic_removal``, is on its way out)."""
_ROUTABLE_EDS_STATUSES = frozenset({"UNKNOWN", "HEALTHY"})


@dataclass(frozen=True)
class Endpoint:
    """One model instance as Envoy should see it."""

    host: str
    """An IP address (Envoy does not resolve names in EDS)."""
    port: int
    priority: int
    """0 = serving, 1 = hot standby."""
    instance: str
    """Instance id; Envoy shows it as the host's ``hostname`` in the admin API."""


@dataclass(frozen=True)
class HostStatus:
    """One host of a model's cluster, as Envoy's admin API reports it."""

    address: str
    port: int
    priority: int
    healthy: bool
    """True when Envoy counts it healthy: no health flag set and an EDS status of healthy/unknown.
    A degraded host (``failed_active_degraded_check``) and one kept only until removal
    (``pending_dynamic_removal``) are not healthy."""
    instance: str = ""
    """The ``hostname`` given in the EDS file (the instance id); empty if none."""
    flags: tuple[str, ...] = ()
    """Why it is not healthy: the set health flags, and ``eds_health_status=...`` if not healthy."""


def _duration(value: timedelta) -> str:
    """A protobuf JSON duration (``"0.25s"``)."""
    text = f"{value.total_seconds():.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _retry_policy(lb: LoadBalancerPolicy) -> dict[str, Any]:
    retries = lb.retries
    # previous_priorities recomputes the priority load after every `update_frequency` attempts and
    # excludes the priorities tried so far. With 2, the first retry may still go to another serving
    # (priority 0) host and the second retry goes to the standbys. With a single retry it must be 1,
    # or the retry would never leave priority 0.
    update_frequency = 2 if retries.attempts >= 2 else 1
    return {
        "retry_on": retries.retry_on,
        "num_retries": retries.attempts,
        "per_try_timeout": _duration(retries.per_try_timeout),
        "retry_host_predicate": [
            {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": _PREVIOUS_HOSTS_TYPE}}
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": _PREVIOUS_PRIORITIES_TYPE, "update_frequency": update_frequency},
        },
    }


def _routes(policy: DRPolicy) -> list[dict[str, Any]]:
    lb = policy.load_balancer

    def action(model: str) -> dict[str, Any]:
        # A fresh dict per route, so a YAML dump has no anchors/aliases for a reader to chase.
        return {"cluster": model, "timeout": _duration(lb.request_timeout), "retry_policy": _retry_policy(lb)}

    by_path = [
        {
            "name": f"{model}-path",
            "match": {"prefix": f"/v1/models/{model}/"},
            "route": action(model),
        }
        for model in policy.model_names
    ]
    by_header = [
        {
            "name": f"{model}-header",
            "match": {"prefix": "/", "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model}}]},
            "route": action(model),
        }
        for model in policy.model_names
    ]
    unknown = {
        "name": "unknown-model",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {
                "inline_string": json.dumps(
                    {
                        "error": "unknown model",
                        "detail": f"use /v1/models/<model>/... or the {MODEL_HEADER} header",
                        "models": policy.model_names,
                    }
                )
            },
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    return [*by_path, *by_header, unknown]


def _cluster(model: str, lb: LoadBalancerPolicy, eds_dir: Path) -> dict[str, Any]:
    hc = lb.health_check
    od = lb.outlier_detection
    return {
        "name": model,
        "type": "EDS",
        "connect_timeout": _duration(CONNECT_TIMEOUT),
        "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {
            "eds_config": {
                "path_config_source": {
                    "path": str(eds_dir / f"{model}.yaml"),
                    # Re-read the file whenever something is moved into the folder: os.replace.
                    "watched_directory": {"path": str(eds_dir)},
                },
                "resource_api_version": "V3",
            }
        },
        "health_checks": [
            {
                "timeout": _duration(hc.timeout),
                "interval": _duration(hc.interval),
                # Envoy checks at no_traffic_interval (default 60 s) while the cluster has never had
                # traffic; a model nobody has called yet must still notice a dead instance quickly.
                "no_traffic_interval": _duration(hc.interval),
                "unhealthy_threshold": hc.unhealthy_threshold,
                "healthy_threshold": hc.healthy_threshold,
                "http_health_check": {"path": hc.path},
            }
        ],
        "outlier_detection": {
            "consecutive_5xx": od.consecutive5xx,
            "interval": _duration(od.interval),
            "base_ejection_time": _duration(od.base_ejection_time),
            "max_ejection_percent": od.max_ejection_percent,
        },
        "common_lb_config": {
            # A host new to Envoy is excluded (not counted as unhealthy) until its first health
            # check, which one pass makes healthy. Adding a serving host therefore does not shift
            # load to the standbys meanwhile. A host that only changes priority keeps its health.
            "ignore_new_hosts_until_first_hc": True,
        },
        # Envoy allows only 3 concurrent retries per cluster by default (max_retries circuit
        # breaker); when a serving instance dies under load every in-flight request retries at
        # once, and the fourth would fail with 503. Retries are bounded per request instead.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_CONCURRENT_RETRIES}]},
        # The EDS file is the truth: a host dropped from it leaves at once, even if it still passes
        # health checks (by default Envoy keeps routing to it until it fails one).
        "ignore_health_on_host_removal": True,
    }


def render_bootstrap(
    policy: DRPolicy, *, listen_host: str, listen_port: int, admin_port: int, eds_dir: Path
) -> dict[str, Any]:
    """An Envoy v3 bootstrap for ``policy``: one listener, one EDS cluster per model.

    Dump it with :func:`envoy_yaml` (a plain ``yaml.safe_dump`` leaves model names such as ``n``
    or ``1e3`` unquoted, which Envoy would read as a bool or a number).

    Requests reach a model by path (``/v1/models/{model}/...``) or by the ``model-name`` header;
    anything else gets a 404 JSON body. Each cluster reads ``eds_dir/{model}.yaml``, which should
    exist (see :func:`write_eds`) before Envoy starts.

    The admin API listens on loopback whatever ``listen_host`` is: it has no authentication and can
    stop Envoy (``/quitquitquit``) or rewrite its state, so only this machine may reach it.
    """
    eds_dir = eds_dir.resolve()
    lb = policy.load_balancer
    hcm = {
        "@type": _HCM_TYPE,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "models",
            "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": _routes(policy)}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}],
    }
    return {
        "node": {"id": "drctl-local", "cluster": "drctl"},
        # Without a downstream connection limit Envoy warns at every start (and has no limit).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CONNECTIONS_TYPE,
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "models",
                    "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [_cluster(model, lb, eds_dir) for model in policy.model_names],
        },
    }


def eds_document(model: str, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The EDS file of one model: a ``DiscoveryResponse`` with one ``ClusterLoadAssignment``."""
    by_priority: dict[int, list[dict[str, Any]]] = {}
    for ep in endpoints:
        if ep.priority < 0:
            raise ValueError(f"endpoint {ep.instance}: priority must be >= 0, got {ep.priority}")
        by_priority.setdefault(ep.priority, []).append(
            {
                "endpoint": {
                    "address": {"socket_address": {"address": ep.host, "port_value": ep.port}},
                    "hostname": ep.instance,
                },
                "metadata": {"filter_metadata": {_METADATA_NAMESPACE: {"instance": ep.instance}}},
            }
        )
    assignment = {
        "@type": _CLA_TYPE,
        "cluster_name": model,
        "endpoints": [
            {"priority": priority, "lb_endpoints": lb_endpoints}
            for priority, lb_endpoints in sorted(by_priority.items())
        ],
    }
    digest = hashlib.sha256(json.dumps(assignment, sort_keys=True).encode()).hexdigest()[:16]
    return {"version_info": digest, "type_url": _CLA_TYPE, "resources": [assignment]}


class _EnvoyDumper(yaml.SafeDumper):
    """Every string double-quoted, no anchors.

    Envoy reads YAML with yaml-cpp and turns a plain scalar into a bool or a number when it can:
    a model named ``n``, ``y`` or ``1e3`` (all valid names) would become ``false`` or ``1000.0``
    and Envoy would reject the file. PyYAML leaves those unquoted, so quote every string.
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _quoted_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')


_EnvoyDumper.add_representer(str, _quoted_str)


def envoy_yaml(document: dict[str, Any]) -> str:
    """YAML text of a bootstrap or EDS document that Envoy reads back exactly as meant.

    Use this, not a plain ``yaml.safe_dump``, to write the bootstrap (see :class:`_EnvoyDumper`).
    """
    return yaml.dump(document, Dumper=_EnvoyDumper, sort_keys=False, allow_unicode=True)


def write_eds(eds_dir: Path, model: str, endpoints: Sequence[Endpoint]) -> None:
    """Atomically replace ``eds_dir/{model}.yaml``: Envoy sees the old file or the new one, never half."""
    eds_dir.mkdir(parents=True, exist_ok=True)
    text = envoy_yaml(eds_document(model, endpoints))
    fd, tmp = tempfile.mkstemp(dir=eds_dir, prefix=f".{model}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, eds_dir / f"{model}.yaml")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(eds_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _host_status(raw: dict[str, Any]) -> HostStatus:
    socket_address = raw.get("address", {}).get("socket_address", {})
    health = raw.get("health_status", {})
    flags = [name for name in _FAILURE_FLAGS if health.get(name)]
    eds_status = health.get("eds_health_status", "UNKNOWN")
    if eds_status not in _ROUTABLE_EDS_STATUSES:
        flags.append(f"eds_health_status={eds_status}")
    return HostStatus(
        address=str(socket_address.get("address", "")),
        port=int(socket_address.get("port_value", 0)),
        priority=int(raw.get("priority", 0)),
        healthy=not flags,
        instance=str(raw.get("hostname", "")),
        flags=tuple(flags),
    )


async def cluster_hosts(admin_url: str, model: str, client: httpx.AsyncClient | None = None) -> list[HostStatus]:
    """The hosts of ``model``'s cluster with their priority and health, from ``/clusters?format=json``.

    Raises ``LookupError`` if Envoy has no such cluster, ``httpx.HTTPError`` if the admin API fails.
    """
    url = f"{admin_url.rstrip('/')}/clusters?format=json"
    async with _client_or_own(client, 5.0) as http:
        response = await http.get(url)
    response.raise_for_status()
    for cluster in response.json().get("cluster_statuses", []):
        if cluster.get("name") == model:
            return [_host_status(raw) for raw in cluster.get("host_statuses", [])]
    raise LookupError(f"Envoy at {admin_url} has no cluster {model!r}")


async def wait_until_ready(
    admin_url: str,
    timeout: float,  # noqa: ASYNC109 - a deadline for the whole polling, as the callers expect
    client: httpx.AsyncClient | None = None,
) -> None:
    """Poll the admin ``/ready`` endpoint until Envoy reports LIVE; ``TimeoutError`` after ``timeout`` s."""
    url = f"{admin_url.rstrip('/')}/ready"
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with _client_or_own(client, 1.0) as http:
        while True:
            try:
                response = await http.get(url)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text.strip()}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Envoy at {admin_url} not ready after {timeout:g}s (last: {last})")
            await asyncio.sleep(0.05)


def _client_or_own(client: httpx.AsyncClient | None, timeout: float) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """The caller's client (left open) or a new one closed on exit."""
    return httpx.AsyncClient(timeout=timeout) if client is None else nullcontext(client)
