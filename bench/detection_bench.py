"""Detection time of the health prober on the real local stack.

    .venv/bin/python bench/detection_bench.py [--runs 5]

One private stack with the prober running (the example policy: probe every 1 s, 500 ms timeout,
3 failures mark down). Each run breaks llama-2-7b's current serving instance — ``kill -9`` or
``SIGSTOP`` (a hung process) in turn — and waits for the prober's own failover to finish and for
reconciliation to bring the hot standbys back before the next run. Detection = the failover's
RTO minus its switch time (failure, as the prober first saw it, to workflow start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from drctl.payloads import FailoverResult, Role, failover_workflow_id
from drctl.policies.loader import load_policy_file
from drctl.workers.stack import LocalStack, isolated_settings

POLICY = Path(__file__).resolve().parents[1] / "examples" / "dr-policy.yaml"
MODEL = "llama-2-7b"


async def wait_for_hot(stack: LocalStack, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hot = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.HOT and i.lb_priority == 1]
        serving = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
        if len(hot) >= count and len(serving) == 1:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("standbys were not replenished")


async def one(stack: LocalStack, how: str) -> tuple[float, float]:
    assert stack.client is not None
    [victim] = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
    handle = stack.client.get_workflow_handle(failover_workflow_id(MODEL, victim.id), result_type=FailoverResult)
    deadline = time.monotonic() + 60
    while True:
        try:
            result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=30)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim.pid, signal.SIGCONT)
    assert result.rto_ms is not None and result.switch_ms is not None
    return result.rto_ms - result.switch_ms, result.rto_ms


async def main(runs: int) -> None:
    policy = load_policy_file(POLICY)
    figures: dict[str, list[tuple[float, float]]] = {"kill -9": [], "SIGSTOP (hung)": []}
    with tempfile.TemporaryDirectory(prefix="drctl-detect-") as tmp:
        stack = LocalStack(isolated_settings(Path(tmp), POLICY), policy, say=lambda _: None, with_prober=True)
        try:
            await stack.start()
            for n in range(runs):
                for how in figures:
                    await wait_for_hot(stack, policy.model(MODEL).hot_standby)
                    detected_ms, rto_ms = await one(stack, how)
                    figures[how].append((detected_ms, rto_ms))
                    print(f"run {n + 1} {how}: detection {detected_ms:.0f} ms, RTO {rto_ms:.0f} ms", file=sys.stderr)
        finally:
            await stack.stop()
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    d = policy.detection
    print(f"policy: probe every {d.probe_interval.total_seconds():g}s, timeout {d.probe_timeout.total_seconds():g}s, "
          f"{d.unhealthy_threshold} failures mark down")  # fmt: skip
    print(f"{'failure':<16} {'runs':>4} {'detection median':>17} {'worst':>7} {'RTO median':>11} {'worst':>7}")
    for how, values in figures.items():
        det = [v[0] for v in values]
        rto = [v[1] for v in values]
        print(
            f"{how:<16} {len(values):>4} {statistics.median(det):>14.0f} ms {max(det):>4.0f} ms "
            f"{statistics.median(rto):>8.0f} ms {max(rto):>4.0f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
