"""The local platform's registry (``instances.json``) at fleet size: what one change costs the
process that makes it, and what reading it back costs every other process (the prober, the xDS
server, the worker's other activities).

    .venv/bin/python bench/registry_bench.py [--instances 100 300 1000] [--changes 50]

For each size, a registry of that many instances (serving + hot standby per model) in a temporary
folder; then ``--changes`` times each: ``update`` (one instance's fields, as promote, register and
eject do), ``claim_epoch`` (each runbook's fencing epoch), and an update followed by a second
registry object's ``view()`` (another process seeing the change). Medians in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drctl.payloads import Role
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance


def fleet(path: Path, instances: int) -> InstanceRegistry:
    registry = InstanceRegistry(path)
    with registry.edit() as records:
        for m in range(instances // 2):
            for k, role in enumerate((Role.SERVING, Role.HOT)):
                record = LocalInstance(
                    id=f"m{m:04d}-{k}",
                    model=f"m{m:04d}",
                    role=role,
                    node=f"gpu-node-{k}",
                    gpu=f"gpu-node-{k}/{m % 16}",
                    zone=f"az-{k + 1}",
                    port=20000 + 2 * m + k,
                    pid=1000 + m,
                    lb_priority=k,
                )
                records[record.id] = record
    return registry


def median_ms(changes: int, change: Callable[[int], object]) -> float:
    times = []
    for i in range(changes):
        began = time.perf_counter()
        change(i)
        times.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(times), 2)


def measure(size: int, changes: int) -> str:
    """One table row: the medians at ``size`` instances."""
    with tempfile.TemporaryDirectory(prefix="drctl-registry-bench-") as tmp:
        path = Path(tmp) / "instances.json"
        registry = fleet(path, size)
        models = size // 2
        update = median_ms(changes, lambda i: registry.update(f"m{i % models:04d}-0", note=f"n{i}"))
        claim = median_ms(changes, lambda i: registry.claim_epoch(f"m{i % models:04d}"))
        other = InstanceRegistry(path)
        other.view()
        reread = []
        for i in range(changes):
            registry.update(f"m{i % models:04d}-1", note=f"r{i}")
            began = time.perf_counter()
            other.view()
            reread.append((time.perf_counter() - began) * 1000)
        size_kib = path.stat().st_size // 1024
    return f"| {size} | {update} | {claim} | {round(statistics.median(reread), 2)} | {size_kib} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()
    print("| instances | update, ms | claim_epoch, ms | another process re-reads, ms | file, KiB |")
    print("|---|---|---|---|---|")
    for size in args.instances:
        print(measure(size, args.changes))


if __name__ == "__main__":
    main()
