"""Memory and start time of the pooled instance mode against one demo-server process per instance.

    .venv/bin/python bench/instance_pool_bench.py [--instances 500] [--checkpoint-size 4MiB]
        [--connections 1] [--json]

Measured, on loopback, with real processes:

- **one demo server** (``python -m drctl.sim.inference_server``, what ``DRCTL_INSTANCE_MODE=process``
  starts per instance): its RSS once its model is loaded and one request answered;
- **one pool** (``python -m drctl.sim.instance_pool``, what ``DRCTL_INSTANCE_MODE=pooled`` starts per
  node): its RSS empty, then with ``--instances`` instances started through its control endpoint one
  after another (as the platform does), each loaded (checkpoint read and checksummed) and holding
  ``--connections`` keep-alive connections that have had one ``/health`` answered (Envoy's health
  checker and the prober each keep one per instance); the time to start them all (every one
  listening) and until every one is loaded; the RSS per instance, (pool - empty pool) / instances.

Every instance loads the same checkpoint (``--checkpoint-size``, the policy's default 4 MiB), as
instances of one model do. Progress goes to stderr; ``--json`` prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import ByteSize, TypeAdapter

from drctl.platforms.local.checkpoints import ensure_checkpoint

MODEL = "bench-model"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(client: httpx.Client, ports: list[int], timeout_s: float) -> None:
    pending = list(ports)
    deadline = time.monotonic() + timeout_s
    while pending:
        still = []
        for port in pending:
            try:
                state = client.get(f"http://127.0.0.1:{port}/load_progress").json()["state"]
            except httpx.TransportError:
                state = "starting"
            if state == "failed":
                raise RuntimeError(f"instance on port {port} failed to load")
            if state != "ready":
                still.append(port)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} instance(s) not ready after {timeout_s}s")
            time.sleep(0.05)


def wait_answers(client: httpx.Client, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            client.get(url)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.02)


def bench_process(checkpoint: Path, logs: Path) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "drctl.sim.inference_server", "--model", MODEL, "--instance", f"{MODEL}-0"]
    with (logs / "demo.log").open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [*command, "--port", str(port), "--checkpoint", str(checkpoint)], stdout=log, stderr=log
        )
    try:
        with httpx.Client(timeout=5.0) as client:
            wait_answers(client, f"http://127.0.0.1:{port}/load_progress", process)
            wait_ready(client, [port], 60)
            ready_s = time.monotonic() - started
            client.get(f"http://127.0.0.1:{port}/health")
            time.sleep(0.2)
            return {"rss_bytes": rss_bytes(process.pid), "threads": threads(process.pid), "ready_s": ready_s}
    finally:
        process.terminate()
        process.wait()


def bench_pool(checkpoint: Path, logs: Path, instances: int, connections: int) -> dict[str, Any]:
    control_port = free_port()
    control = f"http://127.0.0.1:{control_port}"
    command = [sys.executable, "-m", "drctl.sim.instance_pool", "--control-port", str(control_port), "--name", "bench"]
    with (logs / "pool.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    held: list[httpx.Client] = []
    try:
        with httpx.Client(timeout=10.0) as client:
            wait_answers(client, f"{control}/healthz", process)
            time.sleep(0.2)
            empty = rss_bytes(process.pid)
            ports = []
            started = time.monotonic()
            for i in range(instances):
                argv = ["--model", MODEL, "--instance", f"{MODEL}-{i}", "--port", "0", "--checkpoint", str(checkpoint)]
                response = client.post(f"{control}/instances", json={"argv": argv})
                response.raise_for_status()
                ports.append(int(response.json()["port"]))
                if (i + 1) % 100 == 0:
                    print(f"  {i + 1} started", file=sys.stderr)
            start_s = time.monotonic() - started
            wait_ready(client, ports, 600)
            ready_s = time.monotonic() - started
            print(f"  {instances} loaded in {ready_s:.2f}s", file=sys.stderr)
            for _ in range(connections):
                keeper = httpx.Client(
                    timeout=5.0,
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=None),
                )
                held.append(keeper)
                for port in ports:
                    keeper.get(f"http://127.0.0.1:{port}/health").raise_for_status()
            time.sleep(0.5)
            loaded = rss_bytes(process.pid)
            return {
                "instances": instances,
                "connections_per_instance": connections,
                "empty_rss_bytes": empty,
                "rss_bytes": loaded,
                "rss_per_instance_bytes": (loaded - empty) / instances,
                "threads": threads(process.pid),
                "start_s": start_s,
                "ready_s": ready_s,
            }
    finally:
        for keeper in held:
            keeper.close()
        process.terminate()
        process.wait(timeout=30)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--checkpoint-size", default="4MiB")
    parser.add_argument("--connections", type=int, default=1, help="keep-alive connections held per instance")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(TypeAdapter(ByteSize).validate_python(args.checkpoint_size))
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        root = Path(tmp)
        checkpoint = ensure_checkpoint(root / f"{MODEL}.ckpt", MODEL, size).path
        print("one demo-server process…", file=sys.stderr)
        process = bench_process(checkpoint, root)
        print(f"one pool of {args.instances} instances…", file=sys.stderr)
        pool = bench_pool(checkpoint, root, args.instances, args.connections)
    result = {"checkpoint_bytes": size, "process": process, "pool": pool}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    n = pool["instances"]
    print(f"checkpoint {mib(size)}, {pool['connections_per_instance']} keep-alive connection(s) per instance")
    print(f"one demo-server process:  RSS {mib(process['rss_bytes'])}, {process['threads']} threads, "
          f"ready in {process['ready_s']:.2f}s")  # fmt: skip
    print(f"one pool, empty:          RSS {mib(pool['empty_rss_bytes'])}")
    print(f"one pool, {n} instances: RSS {mib(pool['rss_bytes'])}, {pool['threads']} threads")
    print(f"  per instance:           {pool['rss_per_instance_bytes'] / 1024:.0f} KiB "
          f"({process['rss_bytes'] / pool['rss_per_instance_bytes']:.0f}x less than a process)")  # fmt: skip
    print(f"  {n} processes would be: {mib(process['rss_bytes'] * n)}")
    print(f"  all started (listening) in {pool['start_s']:.2f}s, all loaded in {pool['ready_s']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
