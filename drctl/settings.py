"""Where drctl finds Temporal, which ports the local stack uses, and where it keeps its state.

Every setting can be overridden with an environment variable prefixed ``DRCTL_`` (for example
``DRCTL_TEMPORAL_ADDRESS=temporal.example.com:7233``) or a ``.env`` file.

Secrets (the Temporal API key, the fault-injection token) are ``SecretStr`` or files read when
needed; :data:`SECRET_SETTINGS` names them so that a child process gets only those it uses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import stat
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DrctlSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRCTL_", env_file=".env", extra="ignore")

    policy: Path = Field(Path("examples/dr-policy.yaml"), description="DR policy file")
    state_dir: Path = Field(Path(".drctl"), description="state folder of the local platform")
    host: str = "127.0.0.1"

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "drctl"
    temporal_tls: bool = False
    """Use TLS to Temporal (implied by a client certificate or an API key)."""
    temporal_tls_cert: Path | None = None
    """Client certificate (PEM) for mTLS, e.g. Temporal Cloud with certificates."""
    temporal_tls_key: Path | None = None
    temporal_tls_ca: Path | None = None
    """Server CA (PEM) when the server's certificate is not publicly trusted."""
    temporal_api_key: SecretStr | None = None
    """Temporal Cloud API key (sent as a bearer token over TLS)."""
    fault_injection_token: SecretStr | None = None
    """Bearer token of the node agents' fault endpoints (``--allow-fault-injection``); drills send it."""
    fault_injection_token_file: Path | None = None
    """Or a file holding that token (``drctl up`` writes a new one per stack: ``.drctl/fault-token``, 0600)."""

    platform: Literal["local", "kubernetes"] = "local"
    """Where instances run: the embedded local platform or a Kubernetes cluster."""
    kubernetes_namespace: str = "drctl"
    kubernetes_image: str = "vllm/vllm-openai:latest"
    """Image of model instances that reconciliation creates on Kubernetes."""
    kubernetes_model_source: str = "/models/{model}"
    """Where instance pods load their weights from, ``{model}`` replaced by the model's name: a path
    (on ``kubernetes_models_claim``, or in the image) or a Hugging Face id the engine downloads."""
    kubernetes_models_claim: str | None = "drctl-models"
    """The PersistentVolumeClaim holding the weights, mounted read-only at ``/models`` in instance
    pods; empty: none (the weights come with the image or the engine's download)."""
    node_agent_urls: list[str] = Field(default_factory=list)
    """GPU node agents to ask for GPUs to drain (JSON list), e.g. '["http://10.0.0.5:9400"]'."""
    node_agent_service: str | None = None
    """Or a headless Service of the node agent DaemonSet, ``host:port``; every address is asked."""
    kubernetes_context: str | None = None
    """kubeconfig context outside a cluster; inside one the service account is used."""
    kubernetes_istio_virtual_service: str | None = None
    """Istio mode: the VirtualService (in ``kubernetes_namespace``) whose weights a failover shifts
    from each model's primary destination to its standby one and failback shifts back
    (``drctl.platforms.kubernetes.istio``). None: no Istio, the label flip alone routes."""
    kubernetes_istio_primary_host: str = "{model}"
    """Istio mode: the host of a model's primary destination in that VirtualService, ``{model}``
    replaced by the model's name (a short Service name or its FQDN: only the part before the first
    dot is compared)."""
    kubernetes_istio_standby_host: str = "{model}-standby"
    """Istio mode: the host of a model's standby destination, ``{model}`` replaced as above."""
    kubernetes_fault_injection: bool = False
    """Let drills inject faults on the cluster (delete pods, cordon, taint and mark Nodes NotReady,
    Xids through the node agents). Off by default: it also needs the Role and ClusterRole of
    ``deploy/kubernetes/drills``, which a platform team applies deliberately (docs/deploy.md)."""
    drill_lb_url: str | None = None
    """Where a drill sends its load, ``{model}`` replaced by the model's name (on Kubernetes the
    model's Service, e.g. ``http://{model}.drctl.svc:8000``, or an ingress); default ``lb_url``,
    the local stack's Envoy."""
    workflow_sandbox: bool = False
    """Run workflow code in the Temporal SDK's sandbox in the runbook worker. Off by default: a new
    sandbox for every workflow run (each guardian, runbook and budget run) was a quarter of the
    worker's CPU in a zone outage of 300 instances, and drctl's workflows are checked in the sandbox
    anyway: every workflow test and the replay of the recorded histories run sandboxed in CI
    (docs/workflows.md). Turn it on to have a worker refuse non-deterministic calls at run time."""
    worker_workflow_cache: int | None = Field(default=None, ge=2)
    """Workflows the runbook worker keeps in memory between their tasks (the SDK's
    ``max_cached_workflows``). None: sized to the fleet, two per model and 500 more, at least the
    SDK's 1,000 (:func:`drctl.workers.runbook_worker.workflow_cache_size`)."""
    worker_creates_reconcile_schedule: bool = True
    """The runbook worker creates the Temporal Schedule ``drctl-reconcile-standbys`` when it starts
    and the schedule does not exist (every platform: on a cluster nothing else does). An existing
    schedule is left exactly as it is (an operator's pause, interval or note stays). ``drctl up``
    turns this off for its worker: it creates or updates the schedule itself, to the policy."""
    temporal_ui_port: int = 8233
    temporal_http_port: int = 7243
    temporal_metrics_port: int = 7244

    envoy_port: int = 10000
    envoy_admin_port: int = 9901
    xds_port: int = 9903
    """drctl's xDS server (loopback only): Envoy gets every model's endpoints from it over one stream."""
    instance_base_port: int = 18000
    instance_mode: Literal["process", "pooled"] = "process"
    """How the local platform runs demo-server instances: ``process`` (the default), a process each,
    as a real engine runs; ``pooled``, many to a process, one pool per node, each instance still on
    its own port with its own pid (a thread id), so that a fleet of 1,000 fits on a small machine
    (:mod:`drctl.platforms.local.pools`). A setting, not a policy field: the policy says what the
    fleet is, is pure and means the same on Kubernetes, while how this machine simulates the
    fleet's processes is the operator's choice, and the same policy runs in either mode. Only
    instances whose command template runs the demo server are pooled; any other engine keeps its
    process."""
    instance_pool_base_port: int = 17900
    """Pooled mode: the pools' control endpoints listen on loopback from this port, one per node."""
    node_agent_base_port: int = 9400
    """The local stack's node agents listen on this port and the next ones, one per policy node."""
    worker_metrics_port: int = 9464
    """The runbook worker's Prometheus ``/metrics`` (runbooks, RTO, redundancy, budget); 0: off."""
    worker_sdk_metrics_port: int = 9465
    """The Temporal SDK's own runtime metrics of the worker (its Prometheus exporter); 0: off."""
    prober_metrics_port: int = 9466
    """The health prober's Prometheus ``/metrics`` (probes, zone verdicts, reports); 0: off."""
    prometheus_port: int = 9090
    """Where ``drctl up --with-prometheus`` serves Prometheus's UI and API."""

    @field_validator("kubernetes_istio_primary_host", "kubernetes_istio_standby_host")
    @classmethod
    def _a_host_per_model(cls, value: str) -> str:
        """A template naming each model's own host: ``{model}`` in it and no other placeholder."""
        if "{model}" not in value:
            raise ValueError(f"{value!r} must contain {{model}} (each model routes to its own Service)")
        try:
            value.format(model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r}: only {{model}} may be replaced ({exc!r})") from None
        return value

    def fault_token(self) -> str | None:
        """The fault-injection token from ``fault_injection_token`` or its file; None when neither is
        set. Raises ``ValueError`` when the file cannot be read or holds no token."""
        if self.fault_injection_token is not None:
            return self.fault_injection_token.get_secret_value().strip() or None
        if self.fault_injection_token_file is None:
            return None
        return read_secret_file(self.fault_injection_token_file, "DRCTL_FAULT_INJECTION_TOKEN_FILE")

    @property
    def temporal_host_port(self) -> tuple[str, int]:
        host, _, port = self.temporal_address.rpartition(":")
        return host or self.host, int(port)

    @property
    def lb_url(self) -> str:
        return f"http://{self.host}:{self.envoy_port}"

    def drill_load_url(self, model: str) -> str:
        """Where a drill's load for ``model`` goes: ``drill_lb_url`` with the model in it, else ``lb_url``."""
        return self.drill_lb_url.replace("{model}", model) if self.drill_lb_url else self.lb_url

    @property
    def envoy_admin_url(self) -> str:
        """Envoy's admin API listens on loopback whatever ``host`` is: it has no authentication."""
        return f"http://{LOOPBACK}:{self.envoy_admin_port}"

    @property
    def temporal_ui_url(self) -> str:
        return f"http://{self.host}:{self.temporal_ui_port}"


SECRET_SETTINGS = frozenset({"temporal_api_key", "fault_injection_token", "fault_injection_token_file"})
"""Settings a child process gets only when it uses them (see ``drctl.workers.part_env``)."""

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (0600 from the start, not chmod after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(secret + "\n")
    os.replace(tmp, path)


def read_secret_file(path: Path, setting: str) -> str:
    """The secret in ``path`` (surrounding whitespace dropped); ``ValueError`` naming the setting
    when the file cannot be read or is empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{setting} {path}: cannot read it ({exc})") from None
    if not text:
        raise ValueError(f"{setting} {path}: the file is empty")
    return text


MEMORY_ROOT = Path("/dev/shm")
"""Where the local platform keeps the files it can lose (Envoy's endpoints): memory (tmpfs).
``DRCTL_MEMORY_ROOT`` sets another place (``none``: none, they stay in the state folder); like every
``DRCTL_`` variable it reaches the stack's parts, which must all agree on it."""


def memory_root() -> Path | None:
    value = os.environ.get("DRCTL_MEMORY_ROOT", str(MEMORY_ROOT)).strip()
    return None if value.lower() in ("", "none") else Path(value)


def memory_folder(root: Path, base: Path | None = None) -> Path | None:
    """This user's folder in memory for state folder ``root`` (``/dev/shm/drctl-<uid>/<key>``),
    None where there is no such memory (``base``, else :func:`memory_root`) or its folder is not
    this user's alone.

    ``/dev/shm`` is writable by every user: the per-user folder is made with mode 0700 and used only
    if it is a real folder (not a link), owned by this user, that no one else may enter (one made
    beforehand by another user would let that user rewrite where Envoy sends requests). Every part
    of a stack (worker, xDS server, CLI) works this out alike from the state folder alone."""
    base = base if base is not None else memory_root()
    if base is None:
        return None
    top = base / f"drctl-{os.getuid()}"
    try:
        top.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(top)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        return None
    return top / hashlib.sha256(str(root).encode()).hexdigest()[:16]


class StateLayout:
    """The files of the local platform inside the state folder (and, for Envoy's endpoints, in a
    folder in memory of the state folder's own: :attr:`eds_dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._eds_dir: Path | None = None

    @property
    def temporal_db(self) -> Path:
        return self.root / "temporal.db"

    @property
    def envoy_dir(self) -> Path:
        return self.root / "envoy"

    @property
    def envoy_bootstrap(self) -> Path:
        return self.envoy_dir / "bootstrap.yaml"

    @property
    def eds_dir(self) -> Path:
        """Envoy's endpoints, a file per model, **in memory** (:func:`memory_folder`) where there is
        some, else :attr:`state_eds_dir`. They are derived state (``drctl up`` writes them all from
        the registry) and the hottest files of a recovery: each registration and ejection rewrites
        one, and on this project's disk (ext4) the write and rename blocked the worker's event loop
        for 1-4 ms each in a zone outage of 1,000 instances, 0.1-0.4 ms in memory."""
        if self._eds_dir is None:
            memory = memory_folder(self.root)
            self._eds_dir = self.state_eds_dir if memory is None else memory / "eds"
        return self._eds_dir

    @property
    def state_eds_dir(self) -> Path:
        """Where Envoy's endpoints are kept without memory to keep them in (and were before)."""
        return self.envoy_dir / "eds"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def instances_file(self) -> Path:
        return self.root / "instances.json"

    @property
    def cordoned_file(self) -> Path:
        """GPUs kept out of placement (drained, or their zone failed over), with why."""
        return self.root / "cordoned-gpus.json"

    @property
    def prober_status_file(self) -> Path:
        """Written by the prober every half second: how far it got (``drctl up`` waits for it)."""
        return self.root / "prober.json"

    @property
    def fault_token_file(self) -> Path:
        """The fault-injection token of the running stack (mode 0600), for its node agents and drills."""
        return self.root / "fault-token"

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def checkpoint(self, model: str) -> Path:
        """The copy instances load (the fleet's model cache)."""
        return self.checkpoints_dir / f"{model}.ckpt"

    @property
    def repository_dir(self) -> Path:
        return self.root / "repository"

    def good_checkpoint(self, model: str) -> Path:
        """The known-good copy a corrupted checkpoint is restored from (the object store of a real fleet)."""
        return self.repository_dir / f"{model}.ckpt"

    def eds_file(self, model: str) -> Path:
        """The model's EDS file, a folder per model (as ``drctl.platforms.local.envoy.eds_file``)."""
        return self.eds_dir / model / "eds.yaml"
