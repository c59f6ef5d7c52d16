"""``drctl up`` and the processes it runs, each of which can also be run on its own: ``drctl worker``,
``drctl alert-receiver``, ``drctl node-agent`` (pass-throughs to their modules' own options).

Each takes ``--log-format text|json`` (default: ``DRCTL_LOG_FORMAT``, else text); ``drctl up`` hands
its choice on to every part it starts.

The pass-throughs read their settings themselves; the policy they get is the one the other
commands would use (:mod:`drctl.cli.policy_path`), handed on as ``DRCTL_POLICY`` when the user
named none.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from enum import StrEnum
from typing import Annotated

import typer

from drctl.cli.common import EXIT_BAD_INPUT, PolicyOption, StateOption, fail, make_settings, out, show, with_policy
from drctl.cli.policy_path import PolicyNotFound, find_policy
from drctl.cli.render import dot, summary_panel
from drctl.cli.status import status_rows
from drctl.policies.schema import DRPolicy
from drctl.workers.binaries import MissingBinaryError

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
"""Context settings of a command whose options are its module's own (``--help`` included)."""


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="log lines as text, or json: one JSON object a line with workflow and trace ids "
        "\\[default: $DRCTL_LOG_FORMAT or text]",
        case_sensitive=False,
        show_default=False,
    ),
]


def up(
    policy: PolicyOption = None,
    state_dir: StateOption = None,
    fresh: Annotated[bool, typer.Option(help="delete the state folder first (Temporal history too)")] = False,
    prober: Annotated[bool, typer.Option(help="run the health prober, which starts failovers by itself")] = True,
    with_prometheus: Annotated[
        bool,
        typer.Option(
            "--with-prometheus",
            help="run Prometheus beside the stack, scraping it with the shipped rules (UI on DRCTL_PROMETHEUS_PORT)",
        ),
    ] = False,
    log_format: LogFormatOption = None,
) -> None:
    """Bring up the local stack on loopback and keep it running until Ctrl-C.

    Starts the Temporal dev server (SQLite in the state folder, UI on :8233), Envoy (one cluster per
    model), the model instances the policy asks for (serving, hot and warm standbys) and the worker.
    --log-format is that of the parts' logs (in the state folder's logs/), not of this console.
    """
    from drctl.cli.render import status_table
    from drctl.workers.stack import LocalStack, StackError, prometheus_binary

    settings, dr_policy = with_policy(policy, state_dir)
    if with_prometheus:
        try:
            prometheus_binary()  # before anything starts (or is removed by --fresh)
        except MissingBinaryError as exc:
            fail(str(exc))
    _check_alert_tokens(dr_policy)

    def say(line: str) -> None:
        show([dot(line)])

    if fresh and settings.state_dir.exists():
        # Never wipe the state of a stack that is running: check its ports first. What a `drctl up`
        # that died without stopping left running (parts and instances) is stopped, then forgotten.
        try:
            leftover = LocalStack(settings, dr_policy, say=say)
            leftover.stop_leftovers(instances=True)
            leftover.check_ports_free()
        except StackError as exc:
            fail(f"not removing {settings.state_dir}: {exc}")
        shutil.rmtree(settings.state_dir)
        out.print(f"removed {settings.state_dir}")

    async def run() -> None:
        stack = LocalStack(
            settings,
            dr_policy,
            say=say,
            with_prober=prober,
            with_alert_receiver=True,
            with_node_agents=True,
            with_prometheus=with_prometheus,
            log_format=None if log_format is None else log_format.value,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stack.start()
            prometheus_url = stack.prometheus_url if "prometheus" in stack.pids else None
            out.print(summary_panel(stack.settings, dr_policy, prometheus_url), highlight=False)
            out.print(status_table(await status_rows(settings, dr_policy)))
            await stack.supervise(stop)
        finally:
            await stack.stop()

    try:
        asyncio.run(run())
    except (StackError, MissingBinaryError) as exc:
        fail(str(exc))


def _check_alert_tokens(dr_policy: DRPolicy) -> None:
    """Alert tokens the receiver would refuse (both variables set, an unreadable file, a tenant the
    policy lacks) stop ``drctl up`` before anything starts (exit 2). Before, the stack came up
    saying "alert receiver on …" while the receiver exited at once and was restarted every 10 s,
    the reason only in its log."""
    from pydantic import ValidationError

    from drctl.detectors.alert_receiver import AlertReceiverSettings, checked_tokens
    from drctl.detectors.alerts import TokenError
    from drctl.workers.stack import alert_tokens_configured

    if not alert_tokens_configured():
        return  # no receiver to start
    try:
        checked_tokens(AlertReceiverSettings(), dr_policy)
    except (TokenError, ValidationError) as exc:
        fail(f"alert receiver: {exc}", EXIT_BAD_INPUT)


def worker(log_format: LogFormatOption = None) -> None:
    """Run the Temporal worker in the foreground (``drctl up`` starts one for you)."""
    from drctl.workers.runbook_worker import main as worker_main

    settings, _ = with_policy()  # it cannot run without one: say so here, not in a traceback
    os.environ["DRCTL_POLICY"] = str(settings.policy.resolve())
    worker_main([] if log_format is None else ["--log-format", log_format.value])


def alert_receiver(ctx: typer.Context) -> None:
    """Receive Alertmanager webhooks and start runbooks (tokens: DRCTL_ALERT_TOKENS or _FILE).

    Options are those of `python -m drctl.detectors.alert_receiver` (see --help): --host, --port,
    --log-format text|json.
    """
    from drctl.detectors.alert_receiver import main as receiver_main

    _hand_on_policy()
    receiver_main(list(ctx.args), prog="drctl alert-receiver")


def node_agent(ctx: typer.Context) -> None:
    """Report this node's GPUs from NVML (or the policy without NVML); a GPU in "drain" starts
    DrainGpuWorkflow. Options: --node NAME [--host --port 9400 --interval 5 --policy FILE
    --log-format text|json]."""
    from drctl.detectors.gpu_node_agent import main as agent_main

    _hand_on_policy()
    raise typer.Exit(agent_main(list(ctx.args), prog="drctl node-agent"))


def _hand_on_policy() -> None:
    """Set ``DRCTL_POLICY`` to the policy found, when the user set none: these read their settings
    themselves, and would look only in the working directory. When none is found, they say so."""
    settings = make_settings()
    if "policy" in settings.model_fields_set:
        return
    try:
        os.environ["DRCTL_POLICY"] = str(find_policy(settings).resolve())
    except PolicyNotFound:
        pass
