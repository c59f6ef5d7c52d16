#!/usr/bin/env python3
"""Run the node agent's real NVML path on a GPU machine (no fakes) and print what it sees.

    pip install nvidia-ml-py          # the only dependency; the repository supplies the rest
    python scripts/nvml_check.py [--wait SECONDS]

Initialises NVML, prints every GPU's reading and classification as JSON (one document on stdout),
registers for Xid events, waits up to ``--wait`` seconds (default 10) for them, reads and classifies
again (so the correctable-ECC burst rule sees two readings), and exits 0. Without NVML (no driver,
driver not loaded) it prints the reason on stderr and exits 2.

It uses ``drctl.detectors.nvml.NvmlInventory`` / ``XidWatcher`` and the pure
``drctl.policies.gpu_health``: the code the agent runs, without aiohttp, prometheus-client or pydantic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drctl.detectors.nvml import (
    NvmlCallError,
    NvmlInventory,
    NvmlUnavailable,
    XidEvent,
    XidWatcher,
)
from drctl.policies.gpu_health import GpuReading, classify


def _gpu(reading: GpuReading, previous: GpuReading | None, read_ms: float) -> dict[str, Any]:
    health = classify(reading, previous)
    return {
        "reading": dataclasses.asdict(reading),
        "status": health.status,
        "reasons": health.reasons,
        "read_ms": round(read_ms, 2),
    }


def _read_all(
    inventory: NvmlInventory, previous: dict[int, GpuReading], xids: list[XidEvent]
) -> tuple[list[dict[str, Any]], dict[int, GpuReading]]:
    """Read and classify every GPU, counting the Xids received for it."""
    out: list[dict[str, Any]] = []
    readings: dict[int, GpuReading] = {}
    for index in range(inventory.device_count()):
        started = time.perf_counter()
        reading = inventory.read(index)
        elapsed = (time.perf_counter() - started) * 1000
        reading = dataclasses.replace(reading, recent_xids=tuple(e.xid for e in xids if e.gpu_index == index))
        readings[index] = reading
        out.append(_gpu(reading, previous.get(index), elapsed))
    return out, readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for Xid events (default 10)")
    args = parser.parse_args(argv)

    inventory = NvmlInventory()
    started = time.perf_counter()
    try:
        inventory.init()
    except NvmlUnavailable as exc:
        print(f"nvml_check: no NVML: {exc.reason}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"init_ms": round((time.perf_counter() - started) * 1000, 2)}
    try:
        report["driver"] = inventory.driver_version()
        report["gpus"], first = _read_all(inventory, {}, [])

        received: list[XidEvent] = []
        lock = threading.Lock()

        def on_event(event: XidEvent) -> None:
            with lock:
                received.append(event)
            print(f"nvml_check: Xid {event.xid} on GPU {event.gpu_index} ({event.uuid})", file=sys.stderr)

        watcher = XidWatcher(inventory, on_event, timeout_ms=500)
        xid: dict[str, Any] = {"wait_s": args.wait}
        try:
            events = watcher.start()
        except NvmlCallError as exc:
            xid["error"] = str(exc)
            time.sleep(max(0.0, args.wait))
        else:
            xid.update(registered=events.registered, unsupported=events.unsupported, failed=events.failed)
            print(f"nvml_check: waiting {args.wait:g}s for Xid events on GPU(s) {events.registered}", file=sys.stderr)
            time.sleep(max(0.0, args.wait))
            stop_started = time.perf_counter()
            watcher.stop()
            xid["stop_ms"] = round((time.perf_counter() - stop_started) * 1000, 2)
        with lock:
            seen = list(received)
        xid["received"] = [dataclasses.asdict(e) for e in seen]
        report["xid_events"] = xid
        report["gpus_after_wait"], _ = _read_all(inventory, first, seen)
    finally:
        inventory.shutdown()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
