"""The local platform's record of its instances: one JSON file, edited under a file lock.

The worker, ``drctl up`` and ``drctl status`` are separate processes, so every change is a
read-modify-write under ``fcntl.flock`` and lands with an atomic rename.

Each record is a :class:`LocalInstance`: the platform's shared ``Instance`` plus the process that
runs it (loopback host, port, pid). Those stay on this side of the ``Platform`` interface: what the
platform hands to the runbooks is the plain ``Instance`` (:meth:`LocalInstance.to_instance`).

The same file keeps each model's fencing **epoch** (it only grows): a runbook's fenced step checks
its epoch and makes its change under the one lock, so a step of an older runbook cannot slip in
between a newer runbook's claim and its changes.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from pydantic import model_validator

from drctl.payloads import Instance
from drctl.platforms import errors


class LocalInstance(Instance):
    """An instance of the local platform as ``instances.json`` records it: its process as well.

    ``address`` is derived from ``host`` and ``port`` (any given value is replaced), and is not
    written to the file, which keeps the host, port and pid it always had."""

    host: str = "127.0.0.1"
    port: int | None = None
    """The loopback port its process listens on; None for a cold standby: it has no process yet."""
    pid: int | None = None
    """Its process; None before the first start and after a clean stop (``stop_all``)."""

    @model_validator(mode="after")
    def _derive_address(self) -> Self:
        self.address = None if self.port is None else f"{self.host}:{self.port}"
        return self

    def with_changes(self, **changes: object) -> LocalInstance:
        """A copy with ``changes`` applied and validated (``address`` follows a new host or port)."""
        return LocalInstance.model_validate({**self.model_dump(), **changes})

    def to_instance(self) -> Instance:
        """The shared payload, without the process details: what crosses the ``Platform``
        interface (Temporal's pydantic converter would serialise a subclass's extra fields)."""
        return Instance.model_validate(self.model_dump(include=set(Instance.model_fields)))


class InstanceRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._parsed: tuple[bytes, dict[str, Any], dict[str, LocalInstance]] | None = None
        """The file's last content read or written here, parsed and validated: a platform call
        reads the registry several times, and at hundreds of instances parsing and validating it
        each time was a quarter of the worker's CPU in a zone failover (py-spy). Keyed by the
        content itself, not the file's mtime or inode, which two quick writes can share."""

    def _read(self) -> dict[str, Any]:
        return self._parse()[0]

    def _parse(self) -> tuple[dict[str, Any], dict[str, LocalInstance]]:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return {}, {}
        if self._parsed is None or self._parsed[0] != content:
            raw: dict[str, Any] = json.loads(content)
            instances = {item["id"]: LocalInstance.model_validate(item) for item in raw.get("instances", [])}
            self._parsed = (content, raw, instances)
        return self._parsed[1], self._parsed[2]

    def view(self) -> Mapping[str, LocalInstance]:
        """The instances as last parsed, not copied: the same mapping (and objects) for as long as
        the file's content does not change, so a caller that reads often (the prober, ten times a
        second) can tell "unchanged" by identity. Read only: :meth:`load` gives copies to change."""
        return self._parse()[1]

    def load(self) -> dict[str, LocalInstance]:
        """All instances by id (empty when the file does not exist yet); copies, free to change."""
        return {key: instance.model_copy() for key, instance in self._parse()[1].items()}

    def _instances(self, raw: dict[str, Any]) -> dict[str, LocalInstance]:
        """Copies of the instances of ``raw`` (as :meth:`_read` returned it: parsed already)."""
        parsed = self._parsed
        if parsed is not None and parsed[1] is raw:
            return {key: instance.model_copy() for key, instance in parsed[2].items()}
        return {item["id"]: LocalInstance.model_validate(item) for item in raw.get("instances", [])}

    def get(self, instance_id: str) -> LocalInstance | None:
        """A copy of one instance, or None."""
        instance = self._parse()[1].get(instance_id)
        return None if instance is None else instance.model_copy()

    def of_model(self, model: str) -> list[LocalInstance]:
        """Copies of one model's instances (only theirs: copying the whole fleet to pick one model
        out was a quarter of the worker's time in a zone failover of 300 instances)."""
        return [i.model_copy() for i in self._parse()[1].values() if i.model == model]

    def epochs(self) -> dict[str, int]:
        """Each model's fencing epoch (absent: 0)."""
        return {str(k): int(v) for k, v in self._read().get("epochs", {}).items()}

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def edit(self, model: str | None = None, epoch: int | None = None) -> Iterator[dict[str, LocalInstance]]:
        """Yield the instances for changing in place; written back atomically on exit.

        With ``model`` and ``epoch``: a fenced change, refused with the non-retryable ``StaleEpoch``
        (nothing written) when the model's epoch has moved past ``epoch``."""
        with self._locked() as raw:
            epochs = {str(k): int(v) for k, v in raw.get("epochs", {}).items()}
            if model is not None:
                errors.check_epoch(model, epoch, epochs.get(model, 0))
            instances = self._instances(raw)
            yield instances
            self._write(instances, epochs, raw)

    def claim_epoch(self, model: str) -> int:
        """The model's next fencing epoch; from now on, steps with an older one are refused."""
        with self._locked() as raw:
            epochs = {str(k): int(v) for k, v in raw.get("epochs", {}).items()}
            epochs[model] = epochs.get(model, 0) + 1
            self._write(self._instances(raw), epochs, raw)
            return epochs[model]

    def update(self, instance_id: str, epoch: int | None = None, **changes: object) -> LocalInstance:
        """Change one instance's fields; with ``epoch``, fenced on the instance's model."""
        with self._locked() as raw:
            epochs = {str(k): int(v) for k, v in raw.get("epochs", {}).items()}
            instances = self._instances(raw)
            current = instances[instance_id]
            errors.check_epoch(current.model, epoch, epochs.get(current.model, 0))
            updated = current.with_changes(**changes)
            instances[instance_id] = updated
            self._write(instances, epochs, raw)
            return updated

    def _write(self, instances: dict[str, LocalInstance], epochs: dict[str, int], raw: dict[str, Any]) -> None:
        ordered = sorted(instances.values(), key=lambda i: (i.model, _index(i.id), i.id))
        document = {k: v for k, v in raw.items() if k not in ("instances", "epochs")}
        document["epochs"] = dict(sorted(epochs.items()))
        document["instances"] = [i.model_dump(mode="json", exclude={"address"}) for i in ordered]
        content = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, self.path)
        self._parsed = (content, document, {i.id: i.model_copy() for i in ordered})


def _index(instance_id: str) -> int:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
