"""The Dockerfile: the image builds, runs as the unprivileged user the manifests expect, its default
command is the worker, and it starts drctl's CLI and every module the manifests run.

Needs a Docker engine (``docker info`` answers); skipped with the reason where there is none, as on
the project's machines, which have the docker client only. The first build installs drctl's
dependencies into python:3.11-slim (a few minutes; Docker's build cache makes the next ones fast).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = "drctl-test:pytest"
MODULES = (
    "drctl.workers.runbook_worker",
    "drctl.detectors.kube_watcher",
    "drctl.detectors.alert_receiver",
    "drctl.detectors.gpu_node_agent",
)
"""What deploy/kubernetes and the Helm chart run with ``python -m`` (test_manifests checks that list)."""


def docker_engine() -> str:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH, so no Docker engine to build the image with")
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine: `docker info` did not answer in 30 s")
    if info.returncode != 0:
        lines = [line.strip() for line in (info.stderr + info.stdout).splitlines() if line.strip()]
        fallback = lines[-1] if lines else f"exit status {info.returncode}"
        why = next((line for line in lines if "daemon" in line.lower() or "error" in line.lower()), fallback)
        pytest.skip(f"no Docker engine: `docker info` failed ({why})")
    return docker


def docker_run(docker: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker, "run", "--rm", "--network", "none", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[str, str]]:
    docker = docker_engine()
    build = subprocess.run(
        [docker, "build", "--tag", TAG, str(ROOT)], capture_output=True, text=True, timeout=1500, check=False
    )
    assert build.returncode == 0, "docker build failed:\n" + (build.stdout + build.stderr)[-4000:]
    try:
        yield docker, TAG
    finally:
        subprocess.run([docker, "image", "rm", "--force", TAG], capture_output=True, timeout=60, check=False)


def inspect(docker: str, tag: str) -> dict[str, Any]:
    result = subprocess.run([docker, "image", "inspect", tag], capture_output=True, text=True, timeout=60, check=True)
    (found,) = json.loads(result.stdout)
    config: dict[str, Any] = found["Config"]
    return config


@pytest.mark.timeout(1800)
def test_image_runs_as_drctl_with_the_worker_as_default_command(image: tuple[str, str]) -> None:
    docker, tag = image
    config = inspect(docker, tag)
    assert config["User"] == "10001:10001", "the manifests' runAsUser and runAsGroup"
    assert config["Cmd"] == ["python", "-m", "drctl.workers.runbook_worker"]
    assert {"9095/tcp", "9400/tcp"} <= set(config.get("ExposedPorts", {}))
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DRCTL_STATE_DIR"] == "/var/lib/drctl"


@pytest.mark.timeout(1800)
def test_image_starts_the_cli(image: tuple[str, str]) -> None:
    docker, tag = image
    result = docker_run(docker, tag, "drctl", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    for command in ("failover", "status", "reconcile", "drill"):
        assert command in result.stdout, f"`drctl --help` lists no {command}"


@pytest.mark.timeout(1800)
def test_image_imports_what_the_manifests_run_on_a_read_only_root(image: tuple[str, str]) -> None:
    """As on the cluster: read-only root filesystem, the image's user, no network."""
    docker, tag = image
    imports = "; ".join(f"import {module}" for module in MODULES)
    script = f"{imports}; import pathlib; assert not pathlib.Path('/app/tests').exists(); print('ok')"
    result = docker_run(docker, "--read-only", "--tmpfs", "/tmp", tag, "python", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ok"
    help_ = docker_run(docker, "--read-only", tag, "python", "-m", "drctl.detectors.gpu_node_agent", "--help")
    assert help_.returncode == 0 and "--node" in help_.stdout, help_.stdout + help_.stderr
