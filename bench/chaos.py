"""Chaos: the nemesis (``tests/chaos/nemesis.py``) for many rounds on one real local stack.

    .venv/bin/python bench/chaos.py --seed 1 --rounds 10 [--first-round 1] [--quiesce-timeout 120]
        [--json] [--keep] [--no-node-agents]

Brings up a private stack (Temporal dev server, Envoy, demo model processes, worker, prober, node
agents; supervised as under ``drctl up``) in a temporary state folder on free ports, with requests
going through Envoy for every model, then runs rounds ``first-round`` … ``first-round + rounds - 1``
of the seeded schedule: 1 to 3 faults per round (``kill -9`` / ``SIGSTOP`` of serving instances and
hot standbys, duplicate reports from the CLI and Alertmanager, flapping, ``kill -9`` of the worker,
Temporal or Envoy), quiescence, then the invariants.

Prints one line per round (faults, requests ok/failed through Envoy, time to quiescence, each
failure's outcome and time to recover, each killed part's time to come back) and a summary with
the median time to recover per fault kind. Exits 1 at the first violated invariant, printing the
seed and round to replay (``--seed S --rounds N``) and keeping the state folder (logs, Temporal's
database) for the post-mortem; ``--keep`` keeps it in any case. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos.nemesis import (  # noqa: E402 - the nemesis lives with the tests, one level up
    InvariantViolation,
    Nemesis,
    RoundReport,
    chaos_stack,
    summarize,
)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_summary(summary: dict[str, Any], seed: int, elapsed_s: float) -> None:
    print(f"\nsummary: seed {seed}, {summary['rounds']} round(s) in {elapsed_s:.0f}s")
    print(f"  faults: {summary['faults']}")
    print(
        f"  failures injected: {summary['failures_injected']}, extra reports of them (CLI, alerts): "
        f"{summary['duplicate_reports']}, worker kills during a recovery: {summary['worker_kills_mid_recovery']}"
    )
    total = summary["requests_ok"] + summary["requests_failed"]
    print(f"  requests through Envoy: {total}, failed {summary['requests_failed']} {summary['failure_reasons']}")
    print("  median time to recover (fault -> incident closed; a killed part: -> working again):")
    for kind, value in summary["median_recover_s"].items():
        print(f"    {kind}: {value:.2f}s")
    print("  median time to quiescence of rounds with each fault (fleet back at the policy's counts):")
    for kind, value in summary["median_quiesce_s_by_fault"].items():
        print(f"    {kind}: {value:.2f}s")
    print(f"  reconcile runs triggered: {summary['reconcile_triggers']}")
    if summary["extra_incidents"]:
        print(f"  incidents of instances the nemesis did not fail: {summary['extra_incidents']}")
    if summary["lingering"]:
        print(f"  ejected instances whose process outlived its draining: {summary['lingering']}")


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="drctl-chaos-"))
    log(f"state folder {root}; bringing up the stack…")
    reports: list[RoundReport] = []
    began = time.monotonic()
    violation: InvariantViolation | None = None
    try:
        async with chaos_stack(root, node_agents=not args.no_node_agents) as chaos:
            log(f"stack up in {time.monotonic() - began:.1f}s; seed {args.seed}")
            nemesis = Nemesis(chaos, args.seed, quiesce_timeout_s=args.quiesce_timeout, say=log)
            try:
                for round_no in range(args.first_round, args.first_round + args.rounds):
                    report = await nemesis.run_round(round_no)
                    reports.append(report)
                    print(json.dumps(report.as_json()) if args.json else report.line(), flush=True)
            except InvariantViolation as exc:
                violation = exc
            finally:
                (root / "stack.log").write_text("\n".join(chaos.said) + "\n", encoding="utf-8")
    finally:
        elapsed = time.monotonic() - began
        summary = summarize(reports)
        summary["seed"] = args.seed
        summary["host"] = f"{platform.node()} {platform.machine()}, python {platform.python_version()}"
        if args.json:
            print(json.dumps({"summary": summary}))
        else:
            print_summary(summary, args.seed, elapsed)
    if violation is not None:
        print(f"\nINVARIANT VIOLATED: {violation}", flush=True)
        print(f"state folder kept for the post-mortem: {root}", flush=True)
        return 1
    if args.keep:
        print(f"state folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--first-round", type=int, default=1, help="start the schedule at this round")
    parser.add_argument("--quiesce-timeout", type=float, default=120.0, help="seconds a round may take to settle")
    parser.add_argument("--json", action="store_true", help="one JSON document per round, then the summary")
    parser.add_argument("--keep", action="store_true", help="keep the state folder even when every round passes")
    parser.add_argument("--no-node-agents", action="store_true", help="without the GPU node agents (lighter)")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
