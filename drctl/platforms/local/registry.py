"""The local platform's record of its instances: one JSON file (one line per instance), edited
under a file lock.

The worker, ``drctl up`` and ``drctl status`` are separate processes, so every change is a
read-modify-write under ``fcntl.flock`` and lands with an atomic rename.

Each record is a :class:`LocalInstance`: the platform's shared ``Instance`` plus the process that
runs it (loopback host, port, pid). Those stay on this side of the ``Platform`` interface: what the
platform hands to the runbooks is the plain ``Instance`` (:meth:`LocalInstance.to_instance`).

The same file keeps each model's fencing **epoch** (it only grows): a runbook's fenced step checks
its epoch and makes its change under the one lock, so a step of an older runbook cannot slip in
between a newer runbook's claim and its changes. It also keeps the highest instance index each
model has had (``indexes``, it only grows), so that a new instance never takes the id of one that
was deleted (see :meth:`InstanceRegistry.highest_indexes`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import model_validator

from drctl.payloads import Instance
from drctl.platforms import errors
from drctl.platforms.coalesce import Coalescer
from drctl.policies.reconcile import instance_index


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
        interface (Temporal's pydantic converter would serialise a subclass's extra fields).
        Built from this instance's fields as they are, not validated again: they were when this
        one was, and each is immutable (a string, number, enum or time), so nothing is shared
        that could change. (Dumping and validating again was 2-3 % of the worker's samples in a
        zone failover's batch at 1,000 instances.)"""
        fields = {name: getattr(self, name) for name in Instance.model_fields}
        return Instance.model_construct(_fields_set=set(fields), **fields)


@dataclass(frozen=True)
class _Snapshot:
    """The file's content as last read or written here, parsed and validated."""

    content: bytes
    meta: dict[str, Any]
    """Everything but the instances: the epochs, and any key a newer drctl added."""
    instances: dict[str, LocalInstance]
    """By id; the registry's own objects, never handed out to be changed."""
    items: dict[str, dict[str, Any]]
    """Each instance as the file has it (what it was validated from)."""
    lines: dict[str, str] = field(default_factory=dict)
    """Each instance's line of the file, where this process wrote it."""
    _by_model: dict[str, list[LocalInstance]] = field(default_factory=dict, compare=False, repr=False)

    def of_model(self, model: str) -> list[LocalInstance]:
        """One model's instances (the registry's own objects), from an index made once per
        snapshot: a runbook step looks its instance up by model, and at 1,000 instances walking
        the fleet for each was 7 % of the worker's samples in a zone failover's batch."""
        if not self._by_model and self.instances:  # made on the first look (the snapshot is frozen)
            index: dict[str, list[LocalInstance]] = {}
            for instance in self.instances.values():
                index.setdefault(instance.model, []).append(instance)
            self._by_model.update(index)  # in one step: another thread never sees half an index
        return self._by_model.get(model, [])


class EditedInstances(dict[str, LocalInstance]):
    """The instances an :meth:`InstanceRegistry.edit` yields: each is copied the first time it is
    read, so the registry's own objects never reach the caller and an edit of one instance does not
    copy the fleet (copying 1,000 instances for each create and delete was an eighth of the worker's
    CPU in a zone outage of 1,000 instances). :meth:`peek` reads them without copying, for a caller
    that only looks (the ports already taken)."""

    def __init__(self, kept: dict[str, LocalInstance], epochs: Mapping[str, int] | None = None) -> None:
        super().__init__(kept)
        self._copied: set[str] = set()
        self._epochs = dict(epochs or {})

    def fence(self, model: str, epoch: int | None) -> None:
        """Refuse one change of an edit with the non-retryable ``StaleEpoch`` when ``epoch`` is
        older than the model's: an edit that makes the changes of several models (a batch of a
        reconciliation pass) fences each on its own, and writes those not refused."""
        errors.check_epoch(model, epoch, self._epochs.get(model, 0))

    def __getitem__(self, key: str) -> LocalInstance:
        value = super().__getitem__(key)
        if key not in self._copied:
            value = value.model_copy()
            super().__setitem__(key, value)
            self._copied.add(key)
        return value

    def __setitem__(self, key: str, value: LocalInstance) -> None:
        super().__setitem__(key, value)
        self._copied.add(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> list[LocalInstance]:  # type: ignore[override]
        return [self[key] for key in self]

    def items(self) -> list[tuple[str, LocalInstance]]:  # type: ignore[override]
        return [(key, self[key]) for key in self]

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            value = self[key]
            super().pop(key)
            return value
        return default[0] if default else super().pop(key)

    def setdefault(self, key: str, default: LocalInstance) -> LocalInstance:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def copy(self) -> dict[str, LocalInstance]:
        return dict(self.items())

    def peek(self) -> list[LocalInstance]:
        """Every instance as it is now, not copied: to read only."""
        return list(dict.values(self))

    def as_written(self) -> dict[str, LocalInstance]:
        """What the edit leaves: the registry's objects for the instances never read (unchanged),
        the caller's copies for the rest."""
        return dict(dict.items(self))


class _HeldFile:
    """An open descriptor of the file a snapshot was read from or written as, and the file's
    identity then (device, inode, size, modification time).

    While the descriptor is open the file's inode cannot be freed, so no other file on that
    device can have its number: when the path's ``stat`` shows that inode with the same size and
    time, the path is still the very file the snapshot holds, and reading 150 KB (1,000 instances)
    to compare it is not needed. Every write of the registry is a new file renamed over the old
    (never a change in place), so the inode tells a new write; size and time catch an edit in place
    by hand. Reading the file on every look was 7 % of the worker's samples in a zone failover's
    batch at 1,000 instances (py-spy, thirteenth session), and the prober and xDS server look at
    it several times a second."""

    def __init__(self, fd: int, key: tuple[int, int, int, int], snapshot: _Snapshot) -> None:
        self.fd: int | None = fd
        self.key = key
        self.snapshot = snapshot

    @classmethod
    def of(cls, fd: int, snapshot: _Snapshot) -> _HeldFile:
        """Hold ``fd`` (closed here if it cannot be)."""
        try:
            key = _file_key(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, key, snapshot)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _file_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class InstanceRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._parsed: _Snapshot | None = None
        """Keyed by the content itself, not the file's mtime or inode, which two quick writes can
        share. A platform call reads the registry several times, and at hundreds of instances
        parsing and validating it each time was a quarter of the worker's CPU in a zone failover
        (py-spy)."""
        self._written: _Snapshot | None = None
        """What this process's last write put in the file, known before the file shows it: the
        writes of :class:`GroupCommit` run in a thread, and a read on the event loop between the
        write's rename and its ``_parsed`` (the rename lets the loop run) parsed the whole file
        again, 4-5 ms at 1,000 instances: about a tenth of the worker's samples in a zone
        failover's batch (py-spy, thirteenth session)."""
        self._held: _HeldFile | None = None
        """The file of the last snapshot read or written here, kept open (see :class:`_HeldFile`)."""
        self._held_lock = threading.Lock()
        """Held files are swapped by the event loop and by :class:`GroupCommit`'s thread: each
        closes only the one it took out."""

    def _parse(self) -> _Snapshot:
        held = self._held
        if held is not None:
            try:
                unchanged = _file_key(os.stat(self.path)) == held.key
            except OSError:
                unchanged = False
            if unchanged:
                return held.snapshot
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            snapshot = self._snapshot_for(b"")
            self._hold(None)
            return snapshot
        try:
            with open(fd, "rb", closefd=False) as file:
                content = file.read()
            snapshot = self._snapshot_for(content)
        except BaseException:
            os.close(fd)
            raise
        self._hold(_HeldFile.of(fd, snapshot))
        return snapshot

    def _snapshot_for(self, content: bytes) -> _Snapshot:
        """The snapshot of ``content``: the last one parsed or written when it is theirs, else parsed."""
        parsed = self._parsed
        if parsed is not None and parsed.content == content:
            return parsed
        written = self._written
        if written is not None and written.content == content:
            self._parsed = written
            return written
        self._parsed = parsed = self._snapshot_of(content)
        return parsed

    def _hold(self, held: _HeldFile | None) -> None:
        with self._held_lock:
            before, self._held = self._held, held
        if before is not None:
            before.close()

    def _snapshot_of(self, content: bytes) -> _Snapshot:
        """Parse ``content``, validating only the instances that changed since the last snapshot:
        at 1,000 instances every write made every other process (the prober, the xDS server, the
        worker) validate the whole fleet again, ~4 ms each, for one changed instance."""
        if not content:
            return _Snapshot(content, {}, {}, {})
        raw: dict[str, Any] = json.loads(content)
        before = self._parsed
        instances: dict[str, LocalInstance] = {}
        items: dict[str, dict[str, Any]] = {}
        lines: dict[str, str] = {}
        for item in raw.pop("instances", []):
            key = item["id"]
            if before is not None and before.items.get(key) == item:
                instances[key] = before.instances[key]
                if key in before.lines:
                    lines[key] = before.lines[key]
            else:
                instances[key] = LocalInstance.model_validate(item)
            items[key] = item
        return _Snapshot(content, raw, instances, items, lines)

    def view(self) -> Mapping[str, LocalInstance]:
        """The instances as last parsed, not copied: the same mapping (and objects) for as long as
        the file's content does not change, so a caller that reads often (the prober, ten times a
        second) can tell "unchanged" by identity. Read only: :meth:`load` gives copies to change."""
        return self._parse().instances

    def load(self) -> dict[str, LocalInstance]:
        """All instances by id (empty when the file does not exist yet); copies, free to change."""
        return {key: instance.model_copy() for key, instance in self._parse().instances.items()}

    def get(self, instance_id: str) -> LocalInstance | None:
        """A copy of one instance, or None."""
        instance = self._parse().instances.get(instance_id)
        return None if instance is None else instance.model_copy()

    def of_model(self, model: str) -> list[LocalInstance]:
        """Copies of one model's instances (only theirs: copying the whole fleet to pick one model
        out was a quarter of the worker's time in a zone failover of 300 instances)."""
        return [i.model_copy() for i in self._parse().of_model(model)]

    def epochs(self) -> dict[str, int]:
        """Each model's fencing epoch (absent: 0)."""
        return _epochs(self._parse())

    def highest_indexes(self) -> dict[str, int]:
        """The highest index (``model-N``) of each model's instances, those deleted included.

        Reconciliation names a new instance after the highest index it sees; without the deleted
        ones, a standby deleted in a zone outage was re-created under its own id (nemesis-free, in
        every zone outage of ``bench/zone_bench.py``), and whatever still referred to the old one —
        the prober's count of its failed probes, a detector's late report, the guardian's record of
        its settled incident, the runbook's workflow id — applied to the new instance."""
        return _indexes(self._parse())

    @contextmanager
    def _locked(self) -> Iterator[_Snapshot]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._parse()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def edit(self, model: str | None = None, epoch: int | None = None) -> Iterator[EditedInstances]:
        """Yield the instances for changing in place; written back atomically on exit.

        With ``model`` and ``epoch``: a fenced change, refused with the non-retryable ``StaleEpoch``
        (nothing written) when the model's epoch has moved past ``epoch``."""
        with self._locked() as snapshot:
            epochs = _epochs(snapshot)
            instances = EditedInstances(snapshot.instances, epochs)
            if model is not None:
                instances.fence(model, epoch)
            yield instances
            self._write(snapshot, instances.as_written(), epochs)

    def claim_epoch(self, model: str) -> int:
        """The model's next fencing epoch; from now on, steps with an older one are refused."""
        (epoch,) = self.claim_epochs([model])
        return epoch

    def claim_epochs(self, models: list[str]) -> list[int]:
        """:meth:`claim_epoch` for each of ``models`` (in order; a model twice gets two), one write."""
        with self._locked() as snapshot:
            epochs = _epochs(snapshot)
            claimed = []
            for model in models:
                epochs[model] = epochs.get(model, 0) + 1
                claimed.append(epochs[model])
            self._write(snapshot, dict(snapshot.instances), epochs)
            return claimed

    def update(self, instance_id: str, epoch: int | None = None, **changes: object) -> LocalInstance:
        """Change one instance's fields; with ``epoch``, fenced on the instance's model."""
        (updated,) = self.update_many([(instance_id, epoch, changes)])
        if isinstance(updated, Exception):
            raise updated
        return updated  # the registry keeps a copy of its own (_write)

    def update_many(self, changes: list[tuple[str, int | None, dict[str, object]]]) -> list[LocalInstance | Exception]:
        """:meth:`update` for several instances under one lock and one write: each change (instance,
        epoch, fields) is fenced on its own, and what it came to (the instance, or the error it was
        refused with) is in the answer at its place; the rest are written together."""
        with self._locked() as snapshot:
            epochs = _epochs(snapshot)
            instances = dict(snapshot.instances)
            results: list[LocalInstance | Exception] = []
            for instance_id, epoch, fields in changes:
                try:
                    current = instances[instance_id]
                    errors.check_epoch(current.model, epoch, epochs.get(current.model, 0))
                    instances[instance_id] = current.with_changes(**fields)
                except Exception as err:  # refused (stale epoch, unknown id, bad field): this one only
                    results.append(err)
                    continue
                results.append(instances[instance_id])
            if any(not isinstance(r, Exception) for r in results):
                self._write(snapshot, instances, epochs)
            return results

    def _write(self, before: _Snapshot, instances: dict[str, LocalInstance], epochs: dict[str, int]) -> None:
        """Write the file: one line per instance, so the cost of a change is the instances it
        changed (each unchanged one keeps the line it had), not the fleet (at 1,000 instances,
        dumping and indenting the whole fleet made every change ~15 ms of the worker's CPU)."""
        if instances.keys() == before.instances.keys():
            ordered = [instances[key] for key in before.instances]  # the file's order, sorted already
        else:  # sorting 1,000 instances (their ids parsed) on every write was 3 % of the worker's CPU
            ordered = sorted(instances.values(), key=lambda i: (i.model, instance_index(i.id), i.id))
        meta = {k: v for k, v in before.meta.items() if k not in ("epochs", "indexes")}
        meta["epochs"] = dict(sorted(epochs.items()))
        indexes = _indexes(before)
        kept: dict[str, LocalInstance] = {}
        items: dict[str, dict[str, Any]] = {}
        lines: dict[str, str] = {}
        for instance in ordered:
            key = instance.id
            old = before.instances.get(key)
            if old is not None and (old is instance or old.__dict__ == instance.__dict__) and key in before.items:
                kept[key], items[key] = old, before.items[key]
                line = before.lines.get(key)
                lines[key] = line if line is not None else json.dumps(items[key])
            else:
                kept[key] = instance.model_copy()
                # Not the address (derived from host and port), nor an unknown creation time: the
                # file keeps the fields it always had.
                unkept = {"address"} if instance.created_at is not None else {"address", "created_at"}
                items[key] = instance.model_dump(mode="json", exclude=unkept)
                lines[key] = json.dumps(items[key])
                indexes[instance.model] = max(indexes.get(instance.model, -1), instance_index(key))
        meta["indexes"] = dict(sorted(indexes.items()))
        head = "".join(f"{json.dumps(k)}: {json.dumps(v)},\n" for k, v in meta.items())
        body = ",\n".join(lines.values())
        content = ("{\n" + head + '"instances": [\n' + body + ("\n" if body else "") + "]\n}\n").encode("utf-8")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(content)
            self._written = written = _Snapshot(content, meta, kept, items, lines)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._parsed = written
        self._hold(_HeldFile.of(fd, written))  # its identity once in place (a rename may touch it)


def _epochs(snapshot: _Snapshot) -> dict[str, int]:
    return {str(k): int(v) for k, v in snapshot.meta.get("epochs", {}).items()}


def _indexes(snapshot: _Snapshot) -> dict[str, int]:
    """The recorded highest indexes; for a file from before they were recorded, its instances'."""
    recorded = snapshot.meta.get("indexes")
    if recorded is not None:
        return {str(k): int(v) for k, v in recorded.items()}
    indexes: dict[str, int] = {}
    for instance in snapshot.instances.values():
        indexes[instance.model] = max(indexes.get(instance.model, -1), instance_index(instance.id))
    return indexes


class GroupCommit:
    """Registry changes made side by side go to the file in one write (:class:`Coalescer`).

    Each write rewrites the whole file (1,000 instances: ~150 KB) and renames it. In a zone
    failover's batch, sixteen switches at a time each made four of them (claim, promote, register,
    eject): a quarter of the worker's samples, and every other switch waited behind each. Here the
    changes asked for side by side are written together (:meth:`InstanceRegistry.update_many`,
    :meth:`InstanceRegistry.claim_epochs`), one write at a time, **in a thread**: each caller gets
    its own answer or its own error, as from the registry's own methods, and the event loop goes on
    meanwhile. On this project's disk a write held the loop 4-7 ms in a zone outage of 1,000
    instances, half of it waiting on the file system; in a thread, what the loop asks for meanwhile
    goes in the next write. A step waits a little longer for its write (promote, register, eject
    40-75 ms against ~22), the steps that wait on the loop less (the hot check and verify ~150/250 ms
    against ~275/420), and the zone's switch at 1,000 instances was faster in four of five
    alternated pairs, median 15.8 against 19.3 s (docs/benchmarks.md, twelfth session; noisy).
    The file's own lock (``flock``) keeps these writes and any other (a reconciliation's, another
    process's) apart, as it always did."""

    def __init__(self, registry: InstanceRegistry) -> None:
        self.registry = registry

        async def updates(changes: list[tuple[str, int | None, dict[str, object]]]) -> list[LocalInstance | Exception]:
            return await asyncio.to_thread(registry.update_many, changes)

        async def claims(models: list[str]) -> list[int]:
            return await asyncio.to_thread(registry.claim_epochs, models)

        self._updates: Coalescer[tuple[str, int | None, dict[str, object]], LocalInstance] = Coalescer(updates)
        self._claims: Coalescer[str, int] = Coalescer(claims)

    async def update(self, instance_id: str, epoch: int | None = None, **changes: object) -> LocalInstance:
        return await self._updates((instance_id, epoch, changes))

    async def claim_epoch(self, model: str) -> int:
        return await self._claims(model)
