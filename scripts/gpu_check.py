#!/usr/bin/env python3
"""Measure, on a machine with an NVIDIA GPU, what a warm and a cold standby cost: one prepared run.

    pip install torch nvidia-ml-py      # the GPU machine's only extra dependencies
    python scripts/gpu_check.py [--sizes 1,7,14] [--dir /tmp/drctl-gpu-check] [--out figures.json]

1. **NVML, for real**: the node agent's own reading code (``drctl.detectors.nvml``) reads every GPU
   and classifies it (``drctl.policies.gpu_health``), as the agent would on that node.
2. **A PyTorch-backed stand-in** holds real weights of each size (GB, default 1, 7 and 14) and
   measures, per size:
   - *cold load*: a checkpoint file of that size read from disk (its page cache dropped first with
     ``posix_fadvise``, so the disk is read, not memory) into pinned host memory and copied to the GPU;
   - *sleep* (vLLM's level 1): the weights copied from the GPU to pinned host memory, GPU memory freed;
   - *wake*: the weights copied back from pinned host memory to the GPU;
   - and the link itself: host→GPU and GPU→host bandwidth on a pinned 1 GiB buffer, so each figure
     can be read against what the PCIe/NVLink link allows.
3. Prints a table and writes the figures as JSON (``--out``). ``drctl policy explain FILE
   --gpu-figures figures.json`` then estimates warm and cold RTOs from the measured wake and load
   rates instead of its assumptions.

No downloads: the weights are random bytes written by the script. It stays well under 8 minutes on a
current GPU server (it writes and reads ``sum(sizes)`` GB once; ``--sizes`` makes it smaller).

``--cpu`` runs the same measurements with CPU memory in place of the GPU (no pinning): the figures
then say nothing about a GPU — it is how the script is tested on machines without one. Without
PyTorch it reports NVML only and says what is missing (exit 2); without NVML it says why and goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drctl.detectors.nvml import NvmlInventory, NvmlUnavailable
from drctl.policies.gpu_health import classify

GB = 10**9
GIB = 2**30
CHUNK = 64 * 2**20


def nvml_report() -> dict[str, Any]:
    """Every GPU as the node agent reads and classifies it, or why NVML is not there."""
    inventory = NvmlInventory()
    try:
        inventory.init()
    except NvmlUnavailable as exc:
        return {"available": False, "reason": exc.reason}
    try:
        gpus = []
        for index in range(inventory.device_count()):
            reading = inventory.read(index)
            health = classify(reading, None)
            gpus.append(
                {"index": index, "name": reading.name, "memory_total": reading.memory_total, "status": health.status}
            )
        return {"available": True, "driver": inventory.driver_version(), "gpus": gpus}
    finally:
        inventory.shutdown()


def write_checkpoint(path: Path, size: int) -> None:
    """``size`` random bytes (weights that cannot be compressed or deduplicated on the way)."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gib_per_s(size: int, seconds: float) -> float:
    return round(size / GIB / seconds, 2) if seconds > 0 else float("inf")


class Stand_in:
    """Real weights on the device (GPU, or CPU memory with ``--cpu``), moved as vLLM's sleep mode does."""

    def __init__(self, torch: Any, device: str) -> None:
        self.torch = torch
        self.device = device
        self.pin = device.startswith("cuda")

    def sync(self) -> None:
        if self.pin:
            self.torch.cuda.synchronize()

    def timed(self, step: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        started = time.perf_counter()
        result = step()
        self.sync()
        return result, time.perf_counter() - started

    def host_buffer(self, size: int) -> Any:
        return self.torch.empty(size, dtype=self.torch.uint8, pin_memory=self.pin)

    def link(self, size: int = GIB) -> dict[str, float]:
        """Host→device and device→host bandwidth on one pinned buffer (the best of three)."""
        host = self.host_buffer(size)
        on_device = self.torch.empty(size, dtype=self.torch.uint8, device=self.device)
        h2d = min(self.timed(lambda: on_device.copy_(host, non_blocking=True))[1] for _ in range(3))
        d2h = min(self.timed(lambda: host.copy_(on_device, non_blocking=True))[1] for _ in range(3))
        return {"h2d_gib_per_s": gib_per_s(size, h2d), "d2h_gib_per_s": gib_per_s(size, d2h)}

    def measure(self, checkpoint: Path, size: int) -> dict[str, Any]:
        torch = self.torch
        drop_page_cache(checkpoint)
        host = self.host_buffer(size)

        def read_from_disk() -> None:
            view = memoryview(host.numpy())
            with checkpoint.open("rb", buffering=0) as f:
                done = 0
                while done < size:
                    n = f.readinto(view[done : done + CHUNK])
                    if not n:
                        raise OSError(f"{checkpoint} ended after {done} of {size} bytes")
                    done += n

        _, disk_s = self.timed(read_from_disk)
        loaded, h2d_s = self.timed(lambda: host.to(self.device, non_blocking=True))
        # Sleep (level 1): weights offloaded to pinned host memory, the device's copy freed.
        asleep = self.host_buffer(size)
        _, sleep_s = self.timed(lambda: asleep.copy_(loaded, non_blocking=True))
        loaded = None
        if self.pin:
            torch.cuda.empty_cache()
        # Wake: back from host memory to the device.
        woken, wake_s = self.timed(lambda: asleep.to(self.device, non_blocking=True))
        if not bool(torch.equal(woken[:CHUNK].cpu(), host[:CHUNK])):
            raise RuntimeError("the weights came back different after sleep and wake")
        woken = None
        return {
            "size_gb": round(size / GB, 3),
            "cold_load_s": round(disk_s + h2d_s, 3),
            "disk_read_s": round(disk_s, 3),
            "load_h2d_s": round(h2d_s, 3),
            "sleep_s": round(sleep_s, 3),
            "wake_s": round(wake_s, 3),
            "cold_load_gib_per_s": gib_per_s(size, disk_s + h2d_s),
            "sleep_gib_per_s": gib_per_s(size, sleep_s),
            "wake_gib_per_s": gib_per_s(size, wake_s),
        }


def summary(sizes: list[dict[str, Any]]) -> dict[str, float]:
    """The rates ``drctl policy explain --gpu-figures`` uses: medians over the sizes measured."""
    return {
        "wake_gib_per_s": statistics.median(s["wake_gib_per_s"] for s in sizes),
        "sleep_gib_per_s": statistics.median(s["sleep_gib_per_s"] for s in sizes),
        "cold_load_gib_per_s": statistics.median(s["cold_load_gib_per_s"] for s in sizes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    parser.add_argument("--sizes", default="1,7,14", help="weight sizes in GB, comma-separated (default 1,7,14)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the checkpoints are written (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--cpu", action="store_true", help="CPU memory in place of the GPU (tests; no GPU figures)")
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(s) * GB) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes!r}")
    if not sizes or any(s <= 0 for s in sizes):
        parser.error("--sizes: give positive sizes in GB")

    report: dict[str, Any] = {"machine": platform.node(), "python": platform.python_version()}
    report["nvml"] = nvml_report()
    if not report["nvml"]["available"]:
        print(f"gpu_check: no NVML ({report['nvml']['reason']}); going on without it", file=sys.stderr)
    code = 0
    try:
        import torch
    except ImportError:
        report["error"] = "PyTorch is not installed (pip install torch): nothing measured but NVML"
        code = 2
    else:
        device = "cpu" if args.cpu else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            report["error"] = "PyTorch sees no CUDA device: run on a GPU machine, or with --cpu for a dry run"
            code = 2
        else:
            report.update(device=device, torch=torch.__version__, gpu_figures=device == "cuda")
            if device == "cuda":
                report["gpu"] = torch.cuda.get_device_name(0)
            report.update(measure(torch, device, sizes, args.dir))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    if "error" in report:
        print(f"gpu_check: {report['error']}", file=sys.stderr)
    return code


def measure(torch: Any, device: str, sizes: list[int], folder: Path | None) -> dict[str, Any]:
    stand_in = Stand_in(torch, device)
    workdir = Path(tempfile.mkdtemp(prefix="drctl-gpu-check-", dir=folder))
    try:
        results = []
        link = stand_in.link(min(GIB, max(sizes)))
        for size in sizes:
            checkpoint = workdir / f"weights-{size}.bin"
            write_checkpoint(checkpoint, size)
            print(f"gpu_check: {size / GB:g} GB …", file=sys.stderr)
            results.append(stand_in.measure(checkpoint, size))
            checkpoint.unlink()
        return {"link": link, "sizes": results, "summary": summary(results)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
