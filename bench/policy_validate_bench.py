"""Policy validation benchmark: how fast and how lean ``drctl policy validate`` is on big policies.

    .venv/bin/python bench/policy_validate_bench.py [--models 1000 10000 50000] [--nodes 64] [--json]

For each size it writes a generated policy (``--models`` models, each with every per-model field
spelled out, as a platform team writes them; ``--nodes`` GPU nodes; three tenants) to a temporary
file and validates it with :func:`drctl.policies.loader.load_policy_file` in a fresh Python process,
so each figure is that process's own: wall time of the load (read, YAML, schema), models per second,
and the peak resident memory of the process (``ru_maxrss``) next to its resident memory before the
load (the interpreter and drctl's imports). 50,000 models is a policy of about 5 MB.

Why a fresh process per size: peak RSS only grows, so sizes measured in one process would hide
each other's peaks. Progress goes to stderr; ``--json`` prints one JSON document instead of a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRIORITIES = ("critical", "high", "normal")
TENANTS = ("search", "chat", "batch")


def generate_policy(models: int, nodes: int) -> str:
    """A valid policy of ``models`` models over ``nodes`` nodes in three zones (deterministic)."""
    lines = ["models:"]
    for i in range(models):
        priority = PRIORITIES[i % 3]
        lines += [
            f"  - name: model-{i:06d}",
            f"    priority: {priority}",
            f"    tenant: {TENANTS[i % 3]}",
            "    replicas: 1",
            f"    hotStandby: {2 - i % 3}",
            f"    warmStandby: {i % 2}",
            "    coldStandby: 1",
            f"    rto: {10 * (1 + i % 3)}s",
            "    rpo: 1m",
            "    gpuMemory: 16Gi",
        ]
    lines += ["gpuPool:", "  overcommitRatio: 1.5", "  nodes:"]
    for n in range(nodes):
        lines.append(f"    - {{name: gpu-node-{n}, zone: az-{1 + n % 3}, gpus: 8, gpuMemory: 80Gi}}")
    lines.append("tenants:")
    for tenant in TENANTS:
        lines.append(f"  - {{name: {tenant}, weight: 1}}")
    lines += [
        "az_failover: {activeZones: [az-1, az-2], standbyZone: az-3}",
        "detection: {probeInterval: 1s, probeTimeout: 500ms}",
    ]
    return "\n".join(lines) + "\n"


def _rss_mib() -> float:
    """Resident memory now, from /proc (ru_maxrss is only the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child(path: Path) -> None:
    """Validate one file and print what it cost as JSON (runs in its own process)."""
    from drctl.policies.loader import load_policy_file

    before = _rss_mib()
    started = time.perf_counter()
    policy = load_policy_file(path)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"models": len(policy.models), "seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak}
    print(json.dumps(result))


def measure(models: int, nodes: int, folder: Path) -> dict[str, Any]:
    path = folder / f"policy-{models}.yaml"
    path.write_text(generate_policy(models, nodes), encoding="utf-8")
    size = path.stat().st_size
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["models"] != models:
        raise SystemExit(f"validated {result['models']} models, wrote {models}")
    result |= {"bytes": size, "models_per_s": models / result["seconds"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for models in args.models:
            print(f"validating {models} models…", file=sys.stderr)
            results.append(measure(models, args.nodes, Path(tmp)))
    if args.json:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
        print(json.dumps({"machine": machine, "nodes": args.nodes, "results": results}, indent=2))
        return
    print(f"{'models':>8} {'MiB':>7} {'seconds':>8} {'models/s':>10} {'RSS before':>11} {'peak RSS':>9}")
    for r in results:
        print(
            f"{r['models']:>8} {r['bytes'] / 2**20:>7.2f} {r['seconds']:>8.2f} {r['models_per_s']:>10,.0f} "
            f"{r['rss_before_mib']:>8.0f} MiB {r['peak_rss_mib']:>5.0f} MiB"
        )


if __name__ == "__main__":
    main()
