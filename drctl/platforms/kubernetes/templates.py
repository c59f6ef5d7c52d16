"""The pod template of a model instance on Kubernetes, per inference engine (plain dicts, no API calls).

One container, ``model``, serving the OpenAI API on port 8000 (named ``http``):

- **vLLM** (``vllm/vllm-openai``, whose entrypoint is vLLM's OpenAI server): args ``--model <weights>
  --port 8000 --served-model-name <model>`` and the profile's ``server_flags``
  (``--enable-sleep-mode``), env the profile's ``server_env`` (``VLLM_SERVER_DEV_MODE=1``: the sleep,
  wake-up and is-sleeping endpoints).
- **SGLang** (``lmsysorg/sglang``): ``python3 -m sglang.launch_server --model-path <weights> --host
  0.0.0.0 --port 8000 --served-model-name <model> --enable-memory-saver`` (it listens on 127.0.0.1
  unless told).

Both: a readiness probe and a startup probe on the engine's health path. The startup probe is
generous (30 minutes: loading a large model's weights takes minutes) and holds the readiness probe
back until the server first answers. No liveness probe: a hung instance is drctl's to fail over (the
prober, the Kubernetes watcher), not the kubelet's to restart in place. Instances that hold a GPU
request and limit one ``nvidia.com/gpu``; every pod tolerates the GPU nodes' taint and gets a
memory-backed ``/dev/shm`` (the engines' worker processes share tensors through it). The weights
come from ``model_source`` (``/models/{model}`` by default), a read-only PersistentVolumeClaim
mounted at ``/models`` when ``models_claim`` names one.

``deploy/kubernetes/instances/`` holds these templates rendered as YAML for one example instance
per engine (tests/deploy checks they are what this module builds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drctl.policies.engines import Engine, profile

PORT = 8000
GPU_RESOURCE = "nvidia.com/gpu"
TOLERATIONS: list[dict[str, str]] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
"""The instance pods' tolerations: the GPU nodes' own taint, nothing else (placement keeps out a
Node tainted with anything else that closes it: :mod:`.nodes`)."""
MODELS_MOUNT = "/models"

DEFAULT_IMAGES: dict[Engine, str] = {
    Engine.VLLM: "vllm/vllm-openai:latest",
    Engine.SGLANG: "lmsysorg/sglang:latest",
}
"""Each engine's image; pin a version in production (``KubernetesPlatform(images=…)``)."""

STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 180
"""The startup probe gives a server 180 x 10 s = 30 minutes to answer its health path once."""


class EngineNotOnKubernetes(ValueError):
    """The engine has no pod template (the demo stand-in runs on the local platform only)."""


@dataclass(frozen=True)
class InstanceTemplate:
    """What every instance pod of a fleet shares: images, where the weights are, the volume."""

    images: Mapping[Engine, str] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    model_source: str = MODELS_MOUNT + "/{model}"
    """Where the engine loads the weights from (``{model}`` is the model's name): a path (on the
    ``models_claim`` volume, or in the image) or a Hugging Face id."""
    models_claim: str | None = "drctl-models"
    """A PersistentVolumeClaim holding the weights, mounted read-only at ``/models``; None: none."""

    def container(self, engine: Engine, model: str, *, gpu: bool) -> dict[str, Any]:
        """The ``model`` container of an instance of ``model`` served by ``engine``."""
        engine_profile = profile(engine)
        if engine not in (Engine.VLLM, Engine.SGLANG):
            raise EngineNotOnKubernetes(f"no pod template for the {engine} engine (it runs on the local platform)")
        if engine not in self.images:
            raise EngineNotOnKubernetes(f"no image for the {engine} engine")
        weights = self.model_source.format(model=model)
        container: dict[str, Any] = {"name": "model", "image": self.images[engine]}
        if engine == Engine.SGLANG:
            container["command"] = [
                "python3", "-m", "sglang.launch_server", "--model-path", weights, "--host", "0.0.0.0",
                "--port", str(PORT), "--served-model-name", model, *engine_profile.server_flags,
            ]  # fmt: skip
        else:
            container["args"] = [
                "--model", weights, "--port", str(PORT), "--served-model-name", model, *engine_profile.server_flags,
            ]  # fmt: skip
        if engine_profile.server_env:
            container["env"] = [{"name": k, "value": v} for k, v in sorted(engine_profile.server_env.items())]
        container["ports"] = [{"name": "http", "containerPort": PORT}]
        container["startupProbe"] = {
            "httpGet": {"path": engine_profile.health_path, "port": "http"},
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": STARTUP_FAILURES,
        }
        container["readinessProbe"] = {
            "httpGet": {"path": engine_profile.health_path, "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        }
        if gpu:
            container["resources"] = {"requests": {GPU_RESOURCE: "1"}, "limits": {GPU_RESOURCE: "1"}}
        mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        if self.models_claim:
            mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        container["volumeMounts"] = mounts
        return container

    def pod_spec(self, engine: Engine, model: str, *, gpu: bool, node: str | None = None) -> dict[str, Any]:
        """The pod spec: the container, its volumes, the GPU nodes' toleration, and the node."""
        volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
        if self.models_claim:
            volumes.append(
                {"name": "models", "persistentVolumeClaim": {"claimName": self.models_claim, "readOnly": True}}
            )
        spec: dict[str, Any] = {
            "automountServiceAccountToken": False,
            "tolerations": [dict(t) for t in TOLERATIONS],
            "containers": [self.container(engine, model, gpu=gpu)],
            "volumes": volumes,
        }
        if node:
            spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        return spec
