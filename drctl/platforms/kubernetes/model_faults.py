"""A model's weights corrupted inside its serving pod for a drill, through ``pods/exec``; the pod
replaced on restore.

**Which copy.** A pod's model server loads its weights from what its container is started with
(``--model`` for vLLM, ``--model-path`` for SGLang: :mod:`.templates`): a path, or a Hugging Face
id the engine downloads into its cache. A drill overwrites only a copy that is the pod's own: the
container's filesystem (weights in the image, or the engine's download) or an ``emptyDir``. Such a
copy dies with the pod, so deleting the pod is the restore, as the platform's
``restore_checkpoint`` does for a runbook: its Deployment starts a fresh pod that fetches the weights
again. Never the model store: the default template loads ``/models/{model}`` from the
``drctl-models`` claim, mounted read-only and shared by every instance of the model. An exec cannot
write there, and nothing should (it is the good copy every fresh pod loads, and deleting a pod
would not repair it), so the drill is refused there before anything happens
(:func:`weights_in_the_store`), and a file found on any volume other than an ``emptyDir`` is refused
before it is written.

**How.** Three short POSIX shell scripts run by ``sh -c`` in the pod's model container, over the
API server's exec (``connect_get_namespaced_pod_exec`` through ``kubernetes.stream.stream``):

1. *locate* (reads only): the weights file (the path itself, else the first ``*.safetensors``,
   ``*.bin``, ``*.pt``, ``*.pth`` or ``*.ckpt`` of the directory or of the Hugging Face cache's
   snapshot), symlinks resolved, its size and its first :data:`LENGTH` bytes;
2. the file's storage checked against the pod's volumes, and the file recorded in the
   ``InjectedFault`` (with those bytes), before:
3. *corrupt*: the :data:`LENGTH` bytes at offset 0 overwritten with random ones (``dd
   conv=notrunc``: same size), after checking they are still the bytes recorded. Offset 0 on
   purpose: a safetensors file starts with its header's length and a PyTorch file with its archive
   magic, so every loader refuses the file, not only one that checks a checksum (the demo
   stand-in's sha256 sidecar);

then the server is made to load its weights again (its engine's reload calls over HTTP to the pod:
:mod:`drctl.platforms.weights`, as on the local platform), which fails: the instance stops serving,
the watcher and the failover take it from there.

**Restore**, for each file recorded: the pod gone (or another pod of that name) or being deleted:
nothing to do (the failover ejects the instance and scales its Deployment to 0, which takes the pod
and the damaged copy). The pod there: the bytes are read again (*check*); the ones recorded mean the
write never happened, or the container restarted from its image (a fresh copy): left alone.
Anything else, or a container that cannot be asked: the pod is deleted. Idempotent.

**RBAC.** An exec is a WebSocket upgrade of a ``GET`` on ``pods/exec``: the API server authorizes it
as ``get``, and from Kubernetes 1.35 (``AuthorizePodWebsocketUpgradeCreatePermission``) also as
``create``, which is what it always meant; the drills Role grants both. ``get`` on ``pods`` reads the
recorded pod back on restore.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream
from kubernetes.stream.ws_client import ERROR_CHANNEL

from drctl.payloads import DrillTarget, InjectedFault, PodCorruption
from drctl.platforms.kubernetes.node_faults import Call
from drctl.platforms.kubernetes.templates import MODELS_MOUNT, InstanceTemplate
from drctl.platforms.weights import reload_weights
from drctl.policies.engines import EngineProfile

LENGTH = 64
"""Bytes overwritten at the start of the weights file."""
CONTAINER = "model"
"""The model server's container in the platform's pods (:mod:`.templates`); else the first one."""
WEIGHTS_FLAGS = ("--model", "--model-path")
"""How vLLM and SGLang are told where the weights are (the templates' args and command)."""
EXEC_TIMEOUT_S = 60.0
EXEC = ("create", "pods/exec")
"""The verb and resource an exec is called as (a 403 names them)."""

LOCATE = r"""set -eu
w=$1 n=$2
if [ -f "$w" ]; then
  f=$w
else
  d=$w
  if [ ! -d "$d" ]; then
    case $w in /*) echo "$w: no such file or directory in the container" >&2; exit 3 ;; esac
    hub=${HF_HUB_CACHE:-${HF_HOME:-${HOME:-/root}/.cache/huggingface}/hub}
    repo=$hub/models--$(printf '%s' "$w" | sed 's#/#--#g')
    rev=$(cat "$repo/refs/main" 2>/dev/null || true)
    d=$repo/snapshots/$rev
    if [ -z "$rev" ] || [ ! -d "$d" ]; then
      d=$(find "$repo/snapshots" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort | head -n 1)
    fi
    if [ -z "$d" ] || [ ! -d "$d" ]; then
      echo "$w: not a path in the container, nor downloaded into its Hugging Face cache ($hub)" >&2
      exit 3
    fi
  fi
  f=
  for p in '*.safetensors' '*.bin' '*.pt' '*.pth' '*.ckpt'; do
    f=$(find "$d" -maxdepth 1 -name "$p" \( -type f -o -type l \) | sort | head -n 1)
    [ -z "$f" ] || break
  done
  if [ -z "$f" ]; then echo "no weights file (*.safetensors, *.bin, *.pt, *.pth, *.ckpt) in $d" >&2; exit 3; fi
fi
f=$(readlink -f "$f")
size=$(wc -c < "$f" | tr -d ' ')
if [ "$size" -lt "$n" ]; then echo "$f has $size bytes, fewer than the $n a drill overwrites" >&2; exit 3; fi
printf '%s\n%s\n' "$f" "$size"
od -An -v -tx1 -N "$n" "$f" | tr -d ' \n'
"""
"""Args: the weights (path or Hugging Face id), the byte count. Prints the file, its size and its
first bytes in hex, one per line; exit 3 when there is no such file."""

CORRUPT = r"""set -eu
f=$1 n=$2 was=$3
now=$(od -An -v -tx1 -N "$n" "$f" | tr -d ' \n')
if [ "$now" != "$was" ]; then echo "$f changed since it was read: not written" >&2; exit 4; fi
out=$(dd if=/dev/urandom of="$f" bs="$n" count=1 conv=notrunc,fsync 2>&1) || { echo "$out" >&2; exit 5; }
od -An -v -tx1 -N "$n" "$f" | tr -d ' \n'
"""
"""Args: the file, the byte count, its first bytes as recorded (hex). Overwrites them with random
bytes and prints the new ones; exit 4 when they are not the ones recorded, 5 when the write fails."""

CHECK = r"""set -eu
od -An -v -tx1 -N "$2" "$1" | tr -d ' \n'
"""
"""Args: the file, the byte count. Prints its first bytes in hex."""


@dataclass(frozen=True)
class ExecResult:
    code: int
    stdout: str
    stderr: str


def weights_in_the_store(template: InstanceTemplate) -> str | None:
    """Why the pods the platform creates cannot be drilled for model corruption (None: they can):
    their weights are on the read-only claim every instance shares."""
    source = template.model_source
    if not template.models_claim or not (source == MODELS_MOUNT or source.startswith(MODELS_MOUNT + "/")):
        return None
    return (
        f"model-corruption is not injected here: instance pods load their weights from "
        f"{source.replace('{model}', '<model>')} on the "
        f"{template.models_claim} claim, mounted read-only and shared by every instance: the model store "
        "itself, which a drill must not (and through the read-only mount cannot) write. The drill corrupts a "
        "copy of the weights that is the pod's own: set DRCTL_KUBERNETES_MODEL_SOURCE to a Hugging Face id "
        "(the engine downloads it into the pod) or a path in the image, and DRCTL_KUBERNETES_MODELS_CLAIM "
        'to "" (docs/deploy.md, "Drills on a cluster")'
    )


def _exec(core: Any, namespace: str, pod: str, container: str, command: list[str], timeout_s: float) -> ExecResult:
    """One exec, to its end (blocking: the platform's ``call`` runs it in a thread). A refused
    upgrade comes back from the client as an ``ApiException`` with status 0 and the handshake's
    status in its text: it is raised with that status, so a 403 is the platform's PermissionDenied
    and a 404 a pod gone."""
    try:
        ws = stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            container=container,
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )
    except ApiException as exc:
        raise _handshake(exc) from exc
    try:
        ws.run_forever(timeout=timeout_s)
        if ws.is_open():
            raise RuntimeError(f"exec in pod {pod} did not end within {timeout_s:g}s")
        stdout, stderr = ws.read_stdout(), ws.read_stderr()
        status = ws.read_channel(ERROR_CHANNEL)
    finally:
        ws.close()
    return ExecResult(_exit_code(status, pod), str(stdout), str(stderr))


_HANDSHAKE = re.compile(r"Handshake status (\d{3}) ?(.*?)(?: -\+-\+- .*? -\+-\+- (.*))?$", re.S)
"""websocket-client's refused upgrade: ``Handshake status 403 Forbidden -+-+- {headers} -+-+- body``."""


def _handshake(exc: ApiException) -> ApiException:
    found = _HANDSHAKE.search(str(exc.reason or ""))
    if exc.status or found is None:
        return exc
    out = ApiException(status=int(found.group(1)), reason=found.group(2).strip() or "exec refused")
    body = (found.group(3) or "").strip()
    if body[:2] in ("b'", 'b"'):  # older websocket-client versions print the body's bytes
        try:
            body = ast.literal_eval(body).decode("utf-8", "replace")
        except (ValueError, SyntaxError, AttributeError):
            pass
    out.body = body or None
    return out


def _exit_code(status: str, pod: str) -> int:
    """The exit code from the exec's status channel (``{"status": "Success"}``, or ``Failure``
    with the code in ``details.causes`` when the command exited non-zero); other failures (no
    such container, say) raise."""
    try:
        answer = json.loads(status)
    except ValueError:
        raise RuntimeError(f"exec in pod {pod} ended without an exit status") from None
    if answer.get("status") == "Success":
        return 0
    for cause in (answer.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", 1))
    raise RuntimeError(f"exec in pod {pod} failed: {answer.get('message') or answer}")


def _ready(pod: Any) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _container(pod: Any) -> Any:
    containers = pod.spec.containers or []
    return next((c for c in containers if c.name == CONTAINER), containers[0] if containers else None)


def weights_of(container: Any) -> str | None:
    """Where the container's model server loads its weights from (its ``--model`` or
    ``--model-path``), None when neither is given."""
    words: Sequence[str] = [*(container.command or []), *(container.args or [])]
    for i, word in enumerate(words):
        for flag in WEIGHTS_FLAGS:
            if word == flag and i + 1 < len(words):
                return str(words[i + 1])
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
    return None


def _base_url(pod: Any, container: Any) -> str | None:
    ip = pod.status.pod_ip if pod.status else None
    ports = list(container.ports or [])
    port = next((p for p in ports if p.name == "http"), ports[0] if ports else None)
    return f"http://{ip}:{port.container_port}" if ip and port else None


def shared_storage(pod: Any, container: Any, path: str) -> str | None:
    """Why ``path`` in the container is not the pod's own copy (None: it is): it is on a volume
    other than an ``emptyDir``, which outlives the pod or is shared with other pods."""
    mounts = [
        m
        for m in container.volume_mounts or []
        if path == m.mount_path or path.startswith(m.mount_path.rstrip("/") + "/")
    ]
    if not mounts:
        context = container.security_context
        if context is not None and context.read_only_root_filesystem:
            return (
                f"{path} in pod {pod.metadata.name} is in its container's filesystem, which is read-only "
                "(readOnlyRootFilesystem)"
            )
        return None  # the container's own filesystem, which dies with the pod
    mount = max(mounts, key=lambda m: len(m.mount_path))
    volume = next((v for v in pod.spec.volumes or [] if v.name == mount.name), None)
    if volume is not None and volume.empty_dir is not None and not mount.read_only:
        return None
    names: dict[str, str] = getattr(type(volume), "attribute_map", {})  # attribute → the API's field name
    kinds = [field for attr, field in names.items() if attr != "name" and getattr(volume, attr, None) is not None]
    claim = volume.persistent_volume_claim if volume is not None else None
    what = f"{kinds[0] if kinds else 'unknown'}" + (f" {claim.claim_name}" if claim is not None else "")
    read_only = ", mounted read-only" if mount.read_only else ""
    return (
        f"{path} in pod {pod.metadata.name} is on volume {mount.name} ({what}{read_only}), not the pod's own "
        "copy: a drill overwrites only weights in the container's filesystem or an emptyDir, which deleting "
        "the pod restores"
    )


class ModelFaults:
    """Corrupt the serving pod's weights and restore them, through the platform's API calls."""

    def __init__(self, core: Any, namespace: str, call: Call, *, exec_timeout_s: float = EXEC_TIMEOUT_S) -> None:
        self.core = core
        self.namespace = namespace
        self.call = call
        self.exec_timeout_s = exec_timeout_s

    async def exec(self, pod: str, container: str, script: str, *args: str) -> ExecResult:
        """``sh -c script`` with ``args`` in the pod's container, through the API server's exec."""
        command = ["sh", "-c", script, "drctl-drill", *args]
        verb, resource = EXEC
        result: ExecResult = await self.call(
            verb, resource, _exec, self.core, self.namespace, pod, container, command, self.exec_timeout_s
        )
        return result

    async def _serving_pod(self, selector: str, instance: str) -> Any:
        found = await self.call("list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        running = [
            p
            for p in found.items
            if not p.metadata.deletion_timestamp and p.status is not None and p.status.phase == "Running"
        ]
        if not running:
            raise RuntimeError(f"{instance} has no Running pod whose weights could be corrupted")
        return sorted(running, key=lambda p: (not _ready(p), p.metadata.name))[0]

    async def corrupt(self, target: DrillTarget, selector: str, engine: EngineProfile, fault: InjectedFault) -> None:
        """Overwrite the start of the weights file the serving pod loads, then make it load them."""
        if not engine.reload_weights:
            raise RuntimeError(
                f"model-corruption makes the instance reload its weights from disk, and drctl has no such calls "
                f"for {engine.engine} instances (vLLM and the demo only); nothing was written"
            )
        pod = await self._serving_pod(selector, target.instance)
        name = pod.metadata.name
        container = _container(pod)
        weights = weights_of(container) if container is not None else None
        if weights is None:
            raise RuntimeError(
                f"pod {name} does not say where its model server loads its weights from (no "
                f"{' or '.join(WEIGHTS_FLAGS)} in its container's command or args); nothing was written"
            )
        base_url = _base_url(pod, container)
        if base_url is None:
            raise RuntimeError(f"pod {name} has no IP and port to ask for a reload; nothing was written")
        found = await self.exec(name, container.name, LOCATE, weights, str(LENGTH))
        lines = found.stdout.splitlines()
        if found.code != 0 or len(lines) != 3:
            raise RuntimeError(f"no weights file found in pod {name} for {weights}: {found.stderr.strip() or lines}")
        path, size, original = lines
        why = shared_storage(pod, container, path)
        if why is not None:
            raise RuntimeError(f"{why}; nothing was written")
        fault.corrupted_in_pods.append(
            PodCorruption(
                pod=name, uid=pod.metadata.uid, container=container.name, path=path, length=LENGTH, original=original
            )
        )  # recorded before the write: restore finds it written or not
        written = await self.exec(name, container.name, CORRUPT, path, str(LENGTH), original)
        if written.code != 0:
            raise RuntimeError(f"{path} in pod {name} was not overwritten: {written.stderr.strip()}")
        what = f"{path} ({size} bytes) in pod {name}: its first {LENGTH} bytes overwritten through pods/exec"
        try:
            async with httpx.AsyncClient() as http:
                reload = await reload_weights(http, base_url, engine)
        except httpx.HTTPError as exc:
            fault.detail = f"{what}; {target.instance} could not be made to reload its weights"
            raise RuntimeError(f"{what}, but {base_url} did not take the reload: {type(exc).__name__}: {exc}") from exc
        fault.detail = f"{what}; {target.instance} reloaded its weights: {reload}"

    async def restore(self, record: PodCorruption) -> str:
        """Delete the pod if it still holds the overwritten file (or cannot be asked); says what it did."""
        name = record.pod
        try:
            pod = await self.call("get", "pods", self.core.read_namespaced_pod, name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            pod = None
        if pod is None or (record.uid and pod.metadata.uid != record.uid):
            return f"pod {name} is gone, and its copy of {record.path} with it: nothing to restore"
        if pod.metadata.deletion_timestamp:
            return f"pod {name} is being deleted, and its copy of {record.path} with it: nothing to restore"
        try:
            now = await self.exec(name, record.container, CHECK, record.path, str(record.length))
            seen = now.stdout.strip() if now.code == 0 else None
        except ApiException as exc:
            if exc.status == 404:
                return f"pod {name} is gone, and its copy of {record.path} with it: nothing to restore"
            seen = None
        except RuntimeError:
            seen = None
        if seen == record.original:
            return f"pod {name}: {record.path} has its own bytes (never overwritten, or a fresh container): left alone"
        try:
            await self.call("delete", "pods", self.core.delete_namespaced_pod, name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        why = "overwritten" if seen is not None else "could not be read back"
        return f"pod {name} deleted ({record.path} {why}): its Deployment starts a fresh one, which fetches the weights"
