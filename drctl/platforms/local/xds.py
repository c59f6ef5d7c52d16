"""drctl's xDS server: the models' EDS files, pushed to Envoy over one ADS stream.

Why not let Envoy read the files itself: Envoy watches every file-based EDS source through an inotify
instance of its own, and Linux allows a user 128 of them by default (``fs.inotify.max_user_instances``),
so Envoy aborts at about 120 models; with a folder per model each write is read by one cluster, but
the limit stays. Over ADS, Envoy holds one gRPC stream, whatever the fleet's size, and a write to one
model's file sends that model's ``ClusterLoadAssignment`` alone (the xDS protocol lets a server send
only the changed EDS resources), so Envoy's work per change does not grow with the number of models.

The files stay the truth: the platform writes them atomically (``envoy.write_eds``), a restarted
server reads them back, and Envoy keeps the last assignments it got while this server is away. The
server watches the folder (``watchfiles``: one inotify instance for the whole tree) and, as a
safety net for a missed event, looks at every file's modification time every few seconds.

This is the State-of-the-World variant of ADS, the one Envoy speaks by default; only EDS goes
through it (the clusters, routes and listener are static, in the bootstrap). The messages and the
service come from ``envoy-data-plane`` (Envoy's API, generated with betterproto2, served by
grpclib), which lives under its own package name: ``xds-protos`` would put its copies of the
``opentelemetry`` and ``google`` protos over the ones the OpenTelemetry exporter needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles
import yaml
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.service.discovery.v3 import (
    AggregatedDiscoveryServiceBase,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from grpclib.server import Server

log = logging.getLogger("drctl.xds")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # a line per change otherwise

CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
EDS_FILE_NAME = "eds.yaml"
RESCAN_INTERVAL_S = 5.0
"""How often every file's modification time is compared, in case the watcher missed a write."""
WATCH_STEP_MS = 5
"""watchfiles yields a change once no other came for this long: the delay a write adds to a failover."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class AssignmentError(ValueError):
    """An EDS file that is not one ``ClusterLoadAssignment`` for its model."""


def read_assignment(path: Path, model: str) -> ClusterLoadAssignment:
    """The ``ClusterLoadAssignment`` in the EDS file ``path`` (as ``envoy.eds_document`` writes it)."""
    try:
        text = path.read_text(encoding="utf-8")
        # JSON as written since the ninth session (``envoy.eds_text``); YAML from before.
        document = json.loads(text) if text.startswith("{") else yaml.load(text, Loader=_Loader)
        (resource,) = document["resources"]
        fields = {k: v for k, v in resource.items() if k != "@type"}
        assignment = ClusterLoadAssignment.from_dict(fields)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AssignmentError(f"{path}: not an EDS document of one ClusterLoadAssignment: {exc}") from exc
    if assignment.cluster_name != model:
        raise AssignmentError(f"{path}: its assignment is for {assignment.cluster_name!r}, not {model!r}")
    return assignment


def empty_assignment(model: str) -> ClusterLoadAssignment:
    """What a model without an EDS file gets: no endpoints (Envoy answers its requests 503)."""
    return ClusterLoadAssignment(cluster_name=model)


def packed(assignment: ClusterLoadAssignment) -> AnyMessage:
    return AnyMessage(type_url=CLA_TYPE, value=bytes(assignment))


@dataclass
class _Entry:
    resource: AnyMessage
    version: str
    mtime_ns: int


@dataclass
class AssignmentStore:
    """Every model's current assignment, read from ``{eds_dir}/{model}/eds.yaml``; streams subscribe
    to hear which models changed."""

    eds_dir: Path
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _listeners: set[asyncio.Queue[set[str]]] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self._entries)

    def model_of(self, path: Path) -> str | None:
        """The model whose EDS file ``path`` is, or None for any other file."""
        if path.name != EDS_FILE_NAME or path.parent.parent != self.eds_dir:
            return None
        return path.parent.name

    def models_on_disk(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in self.eds_dir.iterdir() if (p / EDS_FILE_NAME).is_file())
        return []

    def load(self, models: Iterable[str]) -> set[str]:
        """Read these models' files again; the models whose assignment changed."""
        changed = set()
        for model in models:
            path = self.eds_dir / model / EDS_FILE_NAME
            try:
                mtime_ns = path.stat().st_mtime_ns
                assignment = read_assignment(path, model)
            except FileNotFoundError:
                continue  # removed, or replaced between the stat and the read: the next event says
            except AssignmentError as exc:
                log.error("%s; Envoy keeps the model's last endpoints", exc)
                continue
            resource = packed(assignment)
            version = hashlib.sha256(resource.value).hexdigest()[:16]
            old = self._entries.get(model)
            self._entries[model] = _Entry(resource, version, mtime_ns)
            if old is None or old.version != version:
                changed.add(model)
        return changed

    def stale(self) -> list[str]:
        """Models whose file is new or was modified since it was last read (the safety-net rescan)."""
        stale = []
        for model in self.models_on_disk():
            entry = self._entries.get(model)
            with contextlib.suppress(FileNotFoundError):
                if entry is None or (self.eds_dir / model / EDS_FILE_NAME).stat().st_mtime_ns != entry.mtime_ns:
                    stale.append(model)
        return stale

    def refresh(self, models: Iterable[str]) -> set[str]:
        """Read ``models`` again and tell every stream which of them changed."""
        changed = self.load(models)
        if changed:
            for queue in self._listeners:
                queue.put_nowait(changed)
        return changed

    def resource(self, model: str) -> tuple[AnyMessage, str]:
        """The packed assignment of ``model`` and its version; an empty one for a model with no file."""
        entry = self._entries.get(model)
        if entry is None:
            return packed(empty_assignment(model)), "none"
        return entry.resource, entry.version

    def subscribe(self) -> asyncio.Queue[set[str]]:
        queue: asyncio.Queue[set[str]] = asyncio.Queue()
        self._listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[set[str]]) -> None:
        self._listeners.discard(queue)


class _Stream:
    """One Envoy's ADS stream: which models it asked for, and which version of each it was sent."""

    def __init__(self, store: AssignmentStore, peer: str) -> None:
        self.store = store
        self.peer = peer
        self.wanted: set[str] = set()
        self.sent: dict[str, str] = {}
        self.nonce = 0
        self.pending: asyncio.Queue[set[str]] = store.subscribe()

    def on_request(self, request: DiscoveryRequest) -> None:
        if request.type_url != CLA_TYPE:
            log.warning("%s asked for %s; this server serves only EDS", self.peer, request.type_url or "(no type)")
            return
        if request.error_detail is not None and request.error_detail.code:
            # A NACK: Envoy keeps what it had. Sending the same thing again would be refused again.
            log.error("Envoy refused EDS version %s: %s", request.version_info, request.error_detail.message)
            return
        self.wanted = set(request.resource_names)
        missing = {name for name in self.wanted if self.sent.get(name) != self.store.resource(name)[1]}
        if missing:
            self.pending.put_nowait(missing)

    async def read(self, requests: AsyncIterator[DiscoveryRequest]) -> None:
        async for request in requests:
            self.on_request(request)

    async def responses(self) -> AsyncIterator[DiscoveryResponse]:
        while True:
            names = await self.pending.get()
            while not self.pending.empty():  # everything that changed meanwhile goes in one response
                names |= self.pending.get_nowait()
            names &= self.wanted
            if not names:
                continue
            resources = []
            for name in sorted(names):
                resource, version = self.store.resource(name)
                resources.append(resource)
                self.sent[name] = version
            self.nonce += 1
            yield DiscoveryResponse(
                version_info=str(self.nonce), type_url=CLA_TYPE, resources=resources, nonce=str(self.nonce)
            )

    def close(self) -> None:
        self.store.unsubscribe(self.pending)


class AggregatedDiscovery(AggregatedDiscoveryServiceBase):
    """ADS, State of the World: each Envoy's stream gets the assignments it asks for, then each
    change as it happens."""

    def __init__(self, store: AssignmentStore) -> None:
        self.store = store
        self.streams = 0

    async def stream_aggregated_resources(
        self, messages: AsyncIterator[DiscoveryRequest]
    ) -> AsyncIterator[DiscoveryResponse]:
        self.streams += 1
        stream = _Stream(self.store, f"stream {self.streams}")
        log.info("Envoy connected (%s)", stream.peer)
        reader = asyncio.create_task(stream.read(messages))
        try:
            async for response in stream.responses():
                if reader.done():
                    break
                yield response
        finally:
            reader.cancel()
            stream.close()
            log.info("Envoy disconnected (%s)", stream.peer)


async def _watch(store: AssignmentStore, stop: asyncio.Event) -> None:
    async for changes in watchfiles.awatch(
        store.eds_dir, stop_event=stop, step=WATCH_STEP_MS, debounce=200, recursive=True, rust_timeout=1000
    ):
        models = {m for _, path in changes if (m := store.model_of(Path(path))) is not None}
        if models:
            store.refresh(models)


async def _rescan(store: AssignmentStore, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RESCAN_INTERVAL_S)
        if changed := store.refresh(store.stale()):
            log.warning("rescan found %d EDS file(s) the watcher missed: %s", len(changed), sorted(changed))


def open_store(eds_dir: Path) -> AssignmentStore:
    """The store of ``eds_dir`` (made if missing), every file on disk read."""
    eds_dir = eds_dir.resolve()
    eds_dir.mkdir(parents=True, exist_ok=True)
    store = AssignmentStore(eds_dir)
    store.load(store.models_on_disk())
    return store


async def serve(store: AssignmentStore, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve ADS on ``host:port`` from ``store`` (see :func:`open_store`) until ``stop`` is set."""
    server = Server([AggregatedDiscovery(store)])
    await server.start(host, port)
    log.info(
        "xDS server on %s:%d serving %d models from %s (pid %d)", host, port, len(store), store.eds_dir, os.getpid()
    )
    tasks = [asyncio.create_task(_watch(store, stop)), asyncio.create_task(_rescan(store, stop))]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        server.close()
        await server.wait_closed()
