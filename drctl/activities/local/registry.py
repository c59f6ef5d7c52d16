"""The local platform's record of its instances: one JSON file, edited under a file lock.

The worker, ``drctl up`` and ``drctl status`` are separate processes, so every change is a
read-modify-write under ``fcntl.flock`` and lands with an atomic rename.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drctl.payloads import Instance


class InstanceRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def load(self) -> dict[str, Instance]:
        """All instances by id (empty when the file does not exist yet)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {item["id"]: Instance.model_validate(item) for item in raw.get("instances", [])}

    def of_model(self, model: str) -> list[Instance]:
        return [i for i in self.load().values() if i.model == model]

    @contextmanager
    def edit(self) -> Iterator[dict[str, Instance]]:
        """Yield the instances for changing in place; written back atomically on exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                instances = self.load()
                yield instances
                self._write(instances)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, instance_id: str, **changes: object) -> Instance:
        with self.edit() as instances:
            updated = instances[instance_id].model_copy(update=changes)
            instances[instance_id] = Instance.model_validate(updated.model_dump())
            return instances[instance_id]

    def _write(self, instances: dict[str, Instance]) -> None:
        ordered = sorted(instances.values(), key=lambda i: (i.model, _index(i.id), i.id))
        body = json.dumps({"instances": [i.model_dump(mode="json") for i in ordered]}, indent=2)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(body + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _index(instance_id: str) -> int:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
