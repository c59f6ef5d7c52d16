"""The environment of each process ``drctl up`` starts: its settings, and only the secrets it uses.

Why: a process's environment is readable in ``/proc/PID/environ`` (by its user and root), is
inherited by whatever it starts, and ends up in crash reports. ``drctl up`` used to hand every
child all of its own environment, so every tenant's alert token was in every model instance. Now:

- model instances (and Temporal, Envoy) get only :func:`drctl.platforms.local.processes.inherited_env`;
- drctl's own parts get that, drctl's settings (``DRCTL_*``, as pydantic-settings reads them back)
  and the non-secret ``DRCTL_*`` variables of this process, plus the secrets their part uses:

  ============== =====================================================================
  part           secrets
  ============== =====================================================================
  every part     the Temporal API key (all of them talk to Temporal; TLS files are paths)
  worker         the fault-injection token (the drills' activities inject Xids)
  node agents    the fault-injection token (they check it) — node names are the parts
  alert_receiver ``DRCTL_ALERT_TOKENS`` / ``DRCTL_ALERT_TOKENS_FILE`` (its tenants' tokens)
  ============== =====================================================================

OpenTelemetry's standard ``OTEL_*`` variables (endpoint, service name, sampler, ``OTEL_SDK_DISABLED``)
go to every drctl part; ``OTEL_EXPORTER_OTLP_HEADERS`` and ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` (a
collector's API key, as a rule) are secrets, given only to the parts that export spans: the worker,
the prober and the alert receiver.

A variable counts as secret when :data:`drctl.settings.SECRET_SETTINGS` names it or its name says so
(``TOKEN``, ``KEY``, ``SECRET``, ``PASSWORD``): an unknown secret is left out rather than leaked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from pydantic import SecretStr

from drctl.platforms.local.processes import inherited_env
from drctl.settings import SECRET_SETTINGS, DrctlSettings

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
ALERT_SECRETS = ("DRCTL_ALERT_TOKENS", "DRCTL_ALERT_TOKENS_FILE")
FAULT_SECRETS = ("fault_injection_token", "fault_injection_token_file")
TEMPORAL_SECRETS = ("temporal_api_key", "temporal_tls_key")
OTEL_SECRETS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
TRACED_PARTS = ("worker", "prober", "alert_receiver")


def _variable(setting: str) -> str:
    return "DRCTL_" + setting.upper()


def is_secret(variable: str) -> bool:
    """True for a ``DRCTL_*`` or ``OTEL_*`` variable that holds (or points at) a secret."""
    if variable.startswith("OTEL_") and variable.endswith("_HEADERS"):
        return True
    if variable.startswith("DRCTL_") and variable[len("DRCTL_") :].lower() in SECRET_SETTINGS:
        return True
    return any(word in variable.upper() for word in SECRET_WORDS)


def secrets_of(part: str, node_names: Collection[str]) -> set[str]:
    """The secret variables part ``part`` of the stack may receive."""
    allowed = {_variable(s) for s in TEMPORAL_SECRETS}
    if part == "worker" or part in node_names:
        allowed |= {_variable(s) for s in FAULT_SECRETS}
    if part == "alert_receiver":
        allowed |= set(ALERT_SECRETS)
    if part in TRACED_PARTS:
        allowed |= set(OTEL_SECRETS)
    return allowed


def part_environment(
    settings: DrctlSettings,
    part: str,
    *,
    node_names: Collection[str] = (),
    state_root: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment for drctl part ``part`` (``worker``, ``prober``, ``alert_receiver``, or
    a node name for its agent). ``environ`` defaults to this process's environment."""
    source = os.environ if environ is None else environ
    allowed = secrets_of(part, node_names)
    env = inherited_env(source)
    for name, value in source.items():
        if name.startswith(("DRCTL_", "OTEL_")) and (not is_secret(name) or name in allowed):
            env[name] = value
    for key, value in settings.model_dump().items():
        name = _variable(key)
        if value is None or (is_secret(name) and name not in allowed):
            continue
        env[name] = _env_value(value)
    env["DRCTL_POLICY"] = str(Path(settings.policy).resolve())
    if state_root is not None:
        env["DRCTL_STATE_DIR"] = str(state_root)
    env["PYTHONUNBUFFERED"] = "1"
    # A secret this process has but this part must not: make sure it is not there in any form.
    for name in list(env):
        if is_secret(name) and name not in allowed:
            del env[name]
    return env


def _env_value(value: object) -> str:
    """A setting as pydantic-settings reads it back from the environment (lists as JSON)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)
