"""Envoy's CPU per EDS write against the number of clusters: one watched folder for every cluster,
a folder per cluster, or drctl's xDS server (one ADS stream).

    .venv/bin/python bench/envoy_fanout_bench.py [--clusters 10 100 500] [--writes 30] [--json]

With one folder watched by every cluster (drctl before issue 12), each ``os.replace`` of one
model's EDS file makes *every* cluster re-read and re-parse its own file: Envoy's work per write
grows with the number of models. With a folder per cluster (``{eds_dir}/{model}/eds.yaml``, what
drctl writes now) only the changed model's cluster re-reads. Both layouts are measured side by side
in one run, on the real Envoy binary with drctl's own bootstrap (the folder layout is the only
difference), as Envoy's CPU time (``/proc/PID/stat``) over ``--writes`` writes to one model's file
less the same time idle, per write.

With ``ads`` (what ``drctl up`` runs since the xDS server), Envoy reads no file: drctl's xDS server
(:mod:`drctl.platforms.local.xds`, its own process here as in the stack) watches the folders and
sends the changed model's assignment alone; its CPU per write is reported too. The file layouts
need an inotify instance per cluster and stop at about 120 clusters on default Linux
(``fs.inotify.max_user_instances`` = 128): such a point is reported as ``Envoy fails``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from drctl.platforms.local import envoy
from drctl.policies.schema import DRPolicy
from drctl.workers.binaries import find_binary
from drctl.workers.stack import free_ports

TICKS = os.sysconf("SC_CLK_TCK")
LAYOUT_TITLES = {"shared": "one shared folder", "per-cluster": "a folder per cluster", "ads": "xDS server (ADS)"}


def policy_of(clusters: int) -> DRPolicy:
    return DRPolicy.model_validate(
        {
            "models": [{"name": f"m{i}", "engine": "demo"} for i in range(clusters)],
            "gpuPool": {"nodes": [{"name": "n0", "zone": "az-1", "gpus": 8, "gpuMemory": "80Gi"}]},
        }
    )


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICKS


def shared_folder(bootstrap: dict[str, Any], eds_dir: Path) -> None:
    """The layout before: every cluster's file in ``eds_dir``, every cluster watching ``eds_dir``."""
    for cluster in bootstrap["static_resources"]["clusters"]:
        source = cluster["eds_cluster_config"]["eds_config"]["path_config_source"]
        source["path"] = str(eds_dir / f"{cluster['name']}.yaml")
        source["watched_directory"] = {"path": str(eds_dir)}


def write_shared(eds_dir: Path, model: str, endpoints: Sequence[envoy.Endpoint]) -> None:
    """``write_eds`` into the shared folder (a temporary file, then ``os.replace``)."""
    text = envoy.envoy_yaml(envoy.eds_document(model, endpoints))
    tmp = eds_dir / f".{model}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, eds_dir / f"{model}.yaml")


async def measure(clusters: int, layout: str, writes: int, workdir: Path) -> dict[str, Any]:
    policy = policy_of(clusters)
    eds_dir = workdir / f"eds-{layout}-{clusters}"
    eds_dir.mkdir(parents=True)
    listen, admin, xds_port = free_ports(3)
    bootstrap = envoy.render_bootstrap(
        policy,
        listen_host="127.0.0.1",
        listen_port=listen,
        admin_port=admin,
        eds_dir=eds_dir,
        xds_port=xds_port if layout == "ads" else None,
    )
    server: asyncio.subprocess.Process | None = None
    if layout == "ads":
        # The server reads {state}/envoy/eds, as in the stack.
        eds_dir = workdir / "state" / "envoy" / "eds"
        for model in policy.model_names:
            envoy.write_eds(eds_dir, model, [])
        write = envoy.write_eds
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "drctl.workers.xds_server",
            env={**os.environ, "DRCTL_STATE_DIR": str(workdir / "state"), "DRCTL_XDS_PORT": str(xds_port)},
            stdout=asyncio.subprocess.DEVNULL, stderr=(workdir / "xds.log").open("wb"),
        )  # fmt: skip
        await asyncio.sleep(1.5)
    elif layout == "shared":
        shared_folder(bootstrap, eds_dir)
        for model in policy.model_names:
            write_shared(eds_dir, model, [])
        write = write_shared
    else:
        for model in policy.model_names:
            envoy.write_eds(eds_dir, model, [])
        write = envoy.write_eds
    config = workdir / f"envoy-{layout}-{clusters}.yaml"
    config.write_text(envoy.envoy_yaml(bootstrap), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        find_binary("envoy"), "-c", str(config), "--log-level", "error", "--concurrency", "1", "--disable-hot-restart",
        stdout=asyncio.subprocess.DEVNULL, stderr=(workdir / "envoy.log").open("wb"),
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                try:
                    if (await http.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        if proc.returncode is not None:
            log = (workdir / "envoy.log").read_text(errors="replace")[-800:]
            raise RuntimeError(f"Envoy exited ({proc.returncode}) with {clusters} clusters: {log}")
        period = 0.1
        pids = [proc.pid] + ([server.pid] if server is not None else [])
        idle_start = [cpu_ms(pid) for pid in pids]
        await asyncio.sleep(period * writes)
        idle = [cpu_ms(pid) - start for pid, start in zip(pids, idle_start, strict=True)]
        busy_start = [cpu_ms(pid) for pid in pids]
        for n in range(writes):
            endpoints = [envoy.Endpoint("127.0.0.1", 1 + (n % 2), 0, "m0-a")]
            await asyncio.to_thread(write, eds_dir, "m0", endpoints)
            await asyncio.sleep(period)
        busy = [cpu_ms(pid) - start for pid, start in zip(pids, busy_start, strict=True)]
        per_write = [round(max(0.0, b - i) / writes, 2) for b, i in zip(busy, idle, strict=True)]
        return {
            "clusters": clusters,
            "layout": layout,
            "cpu_ms_per_write": per_write[0],
            "server_cpu_ms_per_write": per_write[1] if server is not None else None,
        }
    finally:
        for child in (proc, server):
            if child is not None and child.returncode is None:
                child.terminate()
            if child is not None:
                await child.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUT_TITLES), default=list(LAYOUT_TITLES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="drctl-envoy-fanout-") as tmp:
        for clusters in args.clusters:
            for layout in args.layouts:
                runs, server_runs, failure = [], [], None
                for r in range(args.repeats):
                    try:
                        result = await measure(clusters, layout, args.writes, Path(tmp) / f"{layout}-{clusters}-{r}")
                    except RuntimeError as exc:
                        failure = str(exc)
                        break
                    runs.append(result["cpu_ms_per_write"])
                    if result["server_cpu_ms_per_write"] is not None:
                        server_runs.append(result["server_cpu_ms_per_write"])
                rows.append(
                    {
                        "clusters": clusters,
                        "layout": layout,
                        "cpu_ms_per_write": statistics.median(runs) if failure is None else None,
                        "server_cpu_ms_per_write": statistics.median(server_runs) if server_runs else None,
                        "runs": runs,
                        "failure": failure,
                    }
                )
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"Envoy CPU per EDS write (median of {args.repeats}; {args.writes} writes each), {os.cpu_count()} CPUs")
    print("| clusters | " + " | ".join(LAYOUT_TITLES[k] for k in args.layouts) + " |")
    print("|---|" + "---|" * len(args.layouts))

    def cell(row: dict[str, Any]) -> str:
        if row["failure"] is not None:
            return "Envoy fails"
        text = f"{row['cpu_ms_per_write']:.2f} ms"
        if row["server_cpu_ms_per_write"] is not None:
            text += f" (+ xDS server {row['server_cpu_ms_per_write']:.2f} ms)"
        return text

    for clusters in args.clusters:
        cells = [cell(next(r for r in rows if r["clusters"] == clusters and r["layout"] == k)) for k in args.layouts]
        print(f"| {clusters} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    started = time.monotonic()
    asyncio.run(main())
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
