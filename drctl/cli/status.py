"""``drctl status``: the fleet as it is now, from the local stack's state folder, Envoy and Temporal;
on Kubernetes (``DRCTL_PLATFORM=kubernetes``), from the cluster through the Platform interface.

Only what is current is shown. The prober's status file outlives the prober: after a ``drctl up
--no-prober`` it still holds the last run's pid, failures and zone verdicts. So a status file
counts only while its process is alive and keeps writing it (every half second); otherwise the
prober is "not running", and none of what the file says is shown.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.text import Text

from drctl.cli.common import PolicyOption, StateOption, fail, out, read_fleet, show, with_policy
from drctl.cli.render import Lines, budget_line, prober_line, status_table
from drctl.payloads import BudgetState, Instance
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.registry import InstanceRegistry
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings, StateLayout
from drctl.temporal.client import connect
from drctl.temporal.incidents import budget_state

PROBER_STALE_AFTER = timedelta(seconds=10)
"""A prober writes its status file every half second; one not written for this long is not current."""
PROBER_MODULE = b"drctl.detectors.prober"


def status(
    policy: PolicyOption = None,
    state_dir: StateOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show every model's instances: role (tier), load balancer priority, process and Envoy health."""
    settings, dr_policy = with_policy(policy, state_dir)
    if settings.platform != "local":
        platform_status(settings, dr_policy, as_json)
        return
    layout = StateLayout(settings.state_dir)
    if not layout.instances_file.exists():
        fail(f"no local stack state in {layout.root}; start it with `drctl up`")
    rows = asyncio.run(status_rows(settings, dr_policy))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    out.print(status_table(rows))
    show(detector_lines(layout))
    show([budget_line(asyncio.run(read_budget(settings)))])


async def status_rows(settings: DrctlSettings, policy: DRPolicy) -> list[dict[str, object]]:
    """One row per instance in the registry, with its process and its Envoy host's health."""
    registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)
    rows: list[dict[str, object]] = []
    async with httpx.AsyncClient(timeout=1.0) as client:
        for model in policy.model_names:
            try:
                hosts = {h.port: h for h in await envoy.cluster_hosts(settings.envoy_admin_url, model, client)}
            except (httpx.HTTPError, LookupError):
                hosts = {}
            for inst in registry.of_model(model):
                host = hosts.get(inst.port) if inst.port is not None else None
                rows.append(
                    {
                        "model": model,
                        "instance": inst.id,
                        "role": inst.role.value,
                        "lb_priority": inst.lb_priority,
                        "gpu": inst.gpu,
                        "zone": inst.zone,
                        "port": inst.port,
                        "pid": inst.pid,
                        "process": process_state(inst.pid),
                        "envoy": None if host is None else ("healthy" if host.healthy else ",".join(host.flags)),
                        "serves": inst.lb_priority == 0 and host is not None and host.healthy,
                        "note": inst.note,
                    }
                )
    return rows


def platform_status(settings: DrctlSettings, policy: DRPolicy, as_json: bool) -> None:
    """Status of a fleet on another platform than the local one (a cluster): its instances and
    cordoned GPUs as the platform reports them; there is no local process, Envoy or prober to show."""
    fleet, cordoned = asyncio.run(read_fleet(settings, policy))
    rows = [platform_row(instance) for model in policy.model_names for instance in fleet[model]]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    out.print(status_table(rows))
    show([f"platform: {settings.platform}; cordoned GPUs: {', '.join(cordoned) or 'none'}"])
    show([budget_line(asyncio.run(read_budget(settings)))])


def platform_row(instance: Instance) -> dict[str, object]:
    """A status row from what every platform knows of an instance (the same keys as the local rows;
    ``pod`` in ``process``: a pod's name, or why it has none)."""
    port = instance.address.rsplit(":", 1)[1] if instance.address else None
    return {
        "model": instance.model,
        "instance": instance.id,
        "role": instance.role.value,
        "lb_priority": instance.lb_priority,
        "gpu": instance.gpu,
        "zone": instance.zone,
        "port": int(port) if port and port.isdigit() else None,
        "pid": None,
        "process": instance.note or "-",
        "envoy": None,
        "serves": instance.lb_priority == 0 and instance.address is not None,
        "note": instance.note,
        "address": instance.address,
        "node": instance.node,
    }


def process_state(pid: int | None) -> str:
    if pid is None:
        return "-"
    return "running" if processes.is_alive(pid) else "exited"


async def read_budget(settings: DrctlSettings) -> BudgetState | None:
    """The budget, or None: status shows what it can while Temporal is down or restarting."""
    try:
        client = await asyncio.wait_for(connect(settings), timeout=3.0)
        return await budget_state(client, settings.task_queue)
    except Exception:
        return None


# -- the detectors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProberView:
    """The prober as ``drctl status`` shows it: what its status file says, only when it is current."""

    state: str
    """``running``, ``not answering`` (alive, not writing) or ``not running``."""
    detail: str
    unreported: int = 0
    held: int = 0
    """Failures held while their zone's failover runs (it reports the zone's serving instances)."""
    zones: dict[str, str] | None = None


def detector_lines(layout: StateLayout, now: datetime | None = None) -> Lines:
    """One line per part ``drctl up`` supervises (restarts included), then one on the prober, the
    zone checks and the cordoned GPUs."""
    from drctl.workers.stack import supervision_lines

    lines: Lines = [Text(line) for line in supervision_lines(layout)]
    view = read_prober(layout.prober_status_file, now or datetime.now(UTC))
    lines.append(prober_line(view.state, view.detail, view.unreported, view.zones, cordoned_gpus(layout), view.held))
    return lines


def read_prober(path: Path, now: datetime) -> ProberView:
    """Judge the prober's status file: current only while its pid is a live process that wrote
    the file within :data:`PROBER_STALE_AFTER`. A dead pid (or one the system gave to another
    process since) means the file is the last run's: nothing in it is shown."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ProberView("not running", "no status file")
    if not isinstance(status, dict):
        return ProberView("not running", "no status file")
    pid = status.get("pid")
    age = _age(status.get("updated_at"), now)
    if not isinstance(pid, int) or not processes.is_alive(pid):
        return ProberView("not running", "its status file is from an earlier run")
    if age is None or age > PROBER_STALE_AFTER:
        if not _runs_prober(pid):
            return ProberView("not running", "its status file is from an earlier run")
        since = "never" if age is None else f"{age.total_seconds():.0f}s ago"
        return ProberView("not answering", f"pid {pid}, last status {since}")
    unreported = status.get("unreported") or []
    held = status.get("held_for_zone_failover") or []
    zones = status.get("zones")
    return ProberView(
        "running",
        f"pid {pid}, {status.get('ticks')} ticks",
        unreported=len(unreported) if isinstance(unreported, list) else 0,
        held=len(held) if isinstance(held, list) else 0,
        zones={str(k): str(v) for k, v in zones.items()} if isinstance(zones, dict) else None,
    )


def cordoned_gpus(layout: StateLayout) -> list[str]:
    """The GPUs kept out of placement now (the platform's record, whatever the prober does)."""
    try:
        gpus = json.loads(layout.cordoned_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return sorted(str(gpu) for gpu in gpus) if isinstance(gpus, dict | list) else []


def _age(updated_at: object, now: datetime) -> timedelta | None:
    if not isinstance(updated_at, str):
        return None
    try:
        written = datetime.fromisoformat(updated_at)
    except ValueError:
        return None
    if written.tzinfo is None:
        written = written.replace(tzinfo=UTC)
    return now - written


def _runs_prober(pid: int) -> bool:
    """True when ``pid`` is a prober (and not a process that got a dead prober's pid)."""
    try:
        return PROBER_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
