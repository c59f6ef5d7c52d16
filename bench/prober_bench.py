"""The health prober's own CPU against the number of instances it watches.

    .venv/bin/python bench/prober_bench.py [--instances 100 300 1000] [--seconds 10] [--busy N] [--json]

For each size, a generated policy (half as many models as instances, 1 serving + 1 hot standby
each, the example policy's detection settings: a probe per instance per second) is brought up on
the local platform in pooled mode (``DRCTL_INSTANCE_MODE=pooled``: one pool process per node, each
instance on its own port), and the real ``Prober`` watches it in this process for ``--seconds``,
every instance healthy, reporting nothing. The figure is this process's CPU time over the wall
time (``time.process_time``): the prober's loop, its probes and its ``/proc`` reads, as a share of
one core. The pools' CPU (the instances answering) is not counted.

``--busy N`` runs N processes that burn CPU beside it, as a zone outage's worker, Temporal and
pools do on a small machine: every instance is still healthy, so every report is a false one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from drctl.detectors.prober import Prober
from drctl.payloads import FailoverRequest, IncidentTicket
from drctl.platforms.local.platform import LocalPlatform
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.workers.stack import free_ports

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dr-policy.yaml"


def policy_document(instances: int) -> dict[str, Any]:
    models = max(1, instances // 2)
    example = yaml.safe_load(EXAMPLE.read_text())
    return {
        "models": [{"name": f"m{i:04d}", "engine": "demo", "hotStandby": 1, "gpuMemory": "1Gi"} for i in range(models)],
        "tenants": [{"name": "default", "weight": 5, "capability": {"gpus": 64, "memory": "100Ti"}}],
        "gpuPool": {
            "nodes": [
                {"name": f"gpu-node-{n}", "zone": f"az-{n % 2 + 1}", "gpus": 16, "gpuMemory": "80Gi"} for n in range(4)
            ]
        },
        "az_failover": {"activeZones": ["az-1", "az-2"]},
        "detection": example["detection"],
        "local": {"checkpointSize": "16KiB"},
    }


async def measure(instances: int, seconds: float, workdir: Path, busy: int = 0) -> dict[str, Any]:
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy_document(instances), sort_keys=False))
    instance_port, pool_port = free_ports(2)
    settings = DrctlSettings(
        policy=policy_path,
        state_dir=workdir / "state",
        instance_base_port=20000 + instance_port % 5000,
        instance_mode="pooled",
        instance_pool_base_port=pool_port,
    )
    policy = load_policy_file(policy_path)
    fleet = LocalPlatform(settings, policy)
    began = time.monotonic()
    fleet.ensure_fleet()
    await fleet.settle_fleet()
    started_s = time.monotonic() - began

    reports: list[FailoverRequest] = []

    async def report(request: FailoverRequest) -> IncidentTicket:
        reports.append(request)
        raise RuntimeError("the benchmark reports nothing")

    prober = Prober(policy, fleet.registry, report)
    stop = asyncio.Event()
    hogs: list[asyncio.subprocess.Process] = []
    try:
        runner = asyncio.create_task(prober.run(stop))
        await asyncio.sleep(3)  # connections made, every instance probed a few times
        hogs = [await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass") for _ in range(busy)]
        cpu0, wall0, ticks0 = time.process_time(), time.monotonic(), prober.ticks
        await asyncio.sleep(seconds)
        cpu, wall, ticks = time.process_time() - cpu0, time.monotonic() - wall0, prober.ticks - ticks0
        stop.set()
        await runner
    finally:
        for hog in hogs:
            hog.kill()
            await hog.wait()
        await prober.aclose()
        fleet.stop_all()
        await fleet.close()
    watched = len(prober.trackers)
    return {
        "instances": watched,
        "cpu_pct": round(cpu / wall * 100, 1),
        "ticks_per_s": round(ticks / wall, 1),
        "false_reports": len(prober.detections),
        "busy_processes": busy,
        "late_deadlines": prober._http.late_deadlines,
        "fleet_start_s": round(started_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--busy", type=int, default=0, help="processes burning CPU beside the prober")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for count in args.instances:
        with tempfile.TemporaryDirectory(prefix="drctl-prober-bench-") as tmp:
            rows.append(asyncio.run(measure(count, args.seconds, Path(tmp), args.busy)))
        print(f"  {rows[-1]}", file=sys.stderr)
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"The prober's CPU watching N healthy instances for {args.seconds:g} s, {os.cpu_count()} CPUs")
    print("| instances | prober CPU, % of one core | ticks/s (10 wanted) | false reports | deadlines reached late |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = (r["instances"], r["cpu_pct"], r["ticks_per_s"], r["false_reports"], r["late_deadlines"])
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
