"""scripts/gpu_check.py on a machine without a GPU: what the CPU can run of it.

The GPU figures come from a GPU machine only (docs/benchmarks.md says whether they have). Here: the
NVML part reports why there is no NVML, the script without PyTorch says so and exits 2 with the
NVML report, and the measurement itself runs end to end with ``--cpu`` on a small stand-in for
PyTorch backed by numpy (real bytes written to disk, read back with the page cache dropped, copied
"to the device" and back, and checked to come back unchanged).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def load_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeTensor:
    """The few tensor operations the stand-in uses, on a numpy array."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self.array = array

    def copy_(self, other: FakeTensor, non_blocking: bool = False) -> FakeTensor:
        np.copyto(self.array, other.array)
        return self

    def to(self, device: str, non_blocking: bool = False) -> FakeTensor:
        return FakeTensor(self.array.copy())

    def cpu(self) -> FakeTensor:
        return FakeTensor(self.array.copy())

    def numpy(self) -> np.ndarray[Any, Any]:
        return self.array

    def __getitem__(self, key: slice) -> FakeTensor:
        return FakeTensor(self.array[key])


def fake_torch() -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.__version__ = "fake (numpy)"  # type: ignore[attr-defined]
    torch.uint8 = np.uint8  # type: ignore[attr-defined]
    torch.empty = lambda size, dtype, pin_memory=False, device="cpu": FakeTensor(np.empty(size, dtype=dtype))  # type: ignore[attr-defined]
    torch.equal = lambda a, b: bool(np.array_equal(a.array, b.array))  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    return torch


def test_without_pytorch_it_reports_nvml_and_says_what_is_missing(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed here")
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "0.001", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    report = json.loads(out.read_text())
    assert report["nvml"]["available"] is False and report["nvml"]["reason"]  # no NVIDIA driver here
    assert "PyTorch is not installed" in report["error"] and "PyTorch is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_measurement_runs_end_to_end_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    script = load_script()
    out = tmp_path / "figures.json"
    assert script.main(["--cpu", "--sizes", "0.004,0.002", "--dir", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["gpu_figures"] is False
    assert [s["size_gb"] for s in report["sizes"]] == [0.004, 0.002]
    for size in report["sizes"]:
        assert size["cold_load_s"] >= size["disk_read_s"] > 0
        assert size["wake_gib_per_s"] > 0 and size["sleep_gib_per_s"] > 0
    assert set(report["summary"]) == {"wake_gib_per_s", "sleep_gib_per_s", "cold_load_gib_per_s"}
    assert report["link"]["h2d_gib_per_s"] > 0
    assert list(tmp_path.glob("drctl-gpu-check-*")) == []  # the checkpoints are gone


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    with pytest.raises(SystemExit) as exited:
        script.main(["--sizes", "one,two"])
    assert exited.value.code == 2 and "--sizes" in capsys.readouterr().err
