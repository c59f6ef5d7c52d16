"""Every DR drill scenario, several times, on the real local stack; median and worst per figure
against the seed's SLA table (seed §5.2).

    .venv/bin/python bench/drill_bench.py [--runs 5] [--rps 50] [--policy FILE] [--out DIR]

Each round starts a fresh private stack (Temporal, Envoy, model processes, worker, prober, one node
agent per node) from the policy (default: the example policy, zone checks 10 s x 3 as in the seed)
and runs the five scenarios on llama-2-7b through ``DrillWorkflow``, zone outage first (the
serving instance starts in an active zone). Each drill waits until the model is back at its
policy's redundancy before it starts. Prints one Markdown table; with ``--out``, copies every
drill's report (JSON, Markdown, PNG) there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from drctl.payloads import DrillReport, DrillRequest, DrillScenario
from drctl.policies.drills import SEED_SLA_S
from drctl.policies.loader import load_policy_file
from drctl.workers.stack import LocalStack, isolated_settings

POLICY = Path(__file__).resolve().parents[1] / "examples" / "dr-policy.yaml"
ORDER = [
    DrillScenario.ZONE_OUTAGE,
    DrillScenario.POD_CRASH,
    DrillScenario.NODE_DOWN,
    DrillScenario.GPU_FAILURE,
    DrillScenario.MODEL_CORRUPTION,
]


async def round_of_drills(policy: Path, rps: int, out: Path | None) -> list[DrillReport]:
    with tempfile.TemporaryDirectory(prefix="drctl-drill-bench-") as state:
        settings = isolated_settings(Path(state), policy)
        stack = LocalStack(
            settings, load_policy_file(policy), say=lambda _: None, with_prober=True, with_node_agents=True
        )
        reports = []
        try:
            await stack.start()
            assert stack.client is not None
            for scenario in ORDER:
                started = time.monotonic()
                report: DrillReport = await stack.client.execute_workflow(
                    "DrillWorkflow",
                    DrillRequest(scenario=scenario, rps=rps, timeout_s=180),
                    id=f"drill-bench-{scenario}-{uuid.uuid4().hex[:6]}",
                    task_queue=settings.task_queue,
                    result_type=DrillReport,
                )
                m = report.measurement
                rto = "-" if m is None or m.rto_ms is None else f"{m.rto_ms / 1000:.2f}s"
                failed = "-" if m is None else f"{m.failed_requests}/{m.requests}"
                print(
                    f"  {scenario:17} {'passed' if report.passed else 'FAILED'}  RTO {rto}  failed {failed}  "
                    f"({time.monotonic() - started:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
                if out is not None and report.files:
                    target = out / report.drill_id
                    shutil.copytree(Path(report.files["json"]).parent, target, dirs_exist_ok=True)
                reports.append(report)
        finally:
            await stack.stop()
        return reports


def cell(values: list[float | None], seed_s: float | None = None) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    text = f"{statistics.median(got) / 1000:.2f} s ({max(got) / 1000:.2f})"
    if len(got) < len(values):
        text += f" [{len(values) - len(got)} missing]"
    return text


def table(results: dict[DrillScenario, list[DrillReport]]) -> str:
    lines = [
        "| scenario | runs passed | detection | switch | total RTO | seed RTO | RTO / seed | redundancy back "
        "| requests failed | lost in flight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in ORDER:
        reports = results.get(scenario, [])
        ms = [r.measurement for r in reports if r.measurement is not None]
        rtos = [m.rto_ms for m in ms if m.rto_ms is not None]
        seed = SEED_SLA_S[scenario][2]
        ratio = f"{statistics.median(rtos) / 1000 / seed:.3f}" if rtos else "—"
        lines.append(
            f"| {scenario} | {sum(r.passed for r in reports)} of {len(reports)} "
            f"| {cell([m.detection_ms for m in ms])} | {cell([m.switch_ms for m in ms])} "
            f"| {cell([m.rto_ms for m in ms])} | {seed:g} s | {ratio} | {cell([m.redundancy_ms for m in ms])} "
            f"| {sum(m.failed_requests for m in ms)} of {sum(m.requests for m in ms)} "
            f"| {sum(m.lost_in_flight for m in ms)} |"
        )
    zone = [r.measurement.zone_failover_ms for r in results.get(DrillScenario.ZONE_OUTAGE, []) if r.measurement]
    lines += ["", f"Zone outage: zone failover started by the zone checks after {cell(zone)} (seed: detection 30 s)."]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds of the five drills, each on a fresh stack")
    parser.add_argument("--rps", type=int, default=50, help="load through Envoy during each drill")
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--out", type=Path, default=None, help="copy every drill's report here")
    args = parser.parse_args()
    results: dict[DrillScenario, list[DrillReport]] = {}
    for n in range(args.runs):
        print(f"round {n + 1} of {args.runs}", file=sys.stderr, flush=True)
        for report in await round_of_drills(args.policy, args.rps, args.out):
            results.setdefault(report.scenario, []).append(report)
    print(f"# drctl drill bench — {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"policy: {args.policy}; llama-2-7b (critical, 2 hot standbys, rto 10 s); {args.rps} requests/s via Envoy")
    print("median (worst) of the runs")
    print()
    print(table(results))


if __name__ == "__main__":
    asyncio.run(main())
