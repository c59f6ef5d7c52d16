"""The supervisor of ``drctl up``: restart back-off, the stack file's record, and the status lines.

The crash loop runs a real part (a node agent process) that is ``kill -9``ed again as soon as it is
back; the other tests read a stack file as ``drctl status`` does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drctl.payloads import Role
from drctl.platforms.local import processes
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.settings import StateLayout
from drctl.workers.stack import (
    STABLE_AFTER_S,
    LocalStack,
    PartStatus,
    StackError,
    isolated_settings,
    supervision_lines,
)

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


def test_back_off_is_none_then_doubles_to_a_cap() -> None:
    delays = [PartStatus(crashes_in_a_row=n).backoff_s() for n in range(1, 10)]
    assert delays == [0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]


def test_a_part_that_ran_a_while_is_not_crash_looping() -> None:
    part = PartStatus(crashes_in_a_row=5, up_since=100.0)
    part.seen_alive(105.0)  # five seconds after its restart: still in a row
    assert part.backoff_s() == 1.6
    part.seen_alive(100.0 + STABLE_AFTER_S + 0.1)
    assert part.crashes_in_a_row == 0
    part.crashes_in_a_row += 1  # its next death
    assert part.backoff_s() == 0.0  # restarted at once


async def test_a_part_that_keeps_dying_is_restarted_with_growing_back_off(tmp_path: Path) -> None:
    said: list[str] = []
    stack = LocalStack(
        isolated_settings(tmp_path / "state", EXAMPLE_POLICY), load_policy_file(EXAMPLE_POLICY), said.append
    )
    stack.layout.logs_dir.mkdir(parents=True)
    node = "gpu-node-0"
    stack._start_node_agent(node)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(stack.supervise(stop))
    killed: list[int] = []
    try:
        for _ in range(3):
            pid = stack.pids[node]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            deadline = time.monotonic() + 10
            while stack.pids[node] == pid or stack.parts[node].state != "up":
                assert time.monotonic() < deadline, said
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await supervisor
        processes.terminate(stack.pids[node], grace_s=1.0)
    lines = "\n".join(said)
    assert f"WARNING: {node} (pid {killed[0]}) was killed by SIGKILL; restarting it now" in lines
    assert f"WARNING: {node} (pid {killed[1]}) was killed by SIGKILL; restarting it in 0.2s" in lines
    assert f"WARNING: {node} (pid {killed[2]}) was killed by SIGKILL; restarting it in 0.4s" in lines
    record = json.loads(stack.layout.stack_file.read_text())["supervised"][node]
    assert record["pid"] == stack.pids[node] and record["restarts"] == 3
    assert record["last_exit"] == "was killed by SIGKILL" and record["state"] == "up"


def _write(layout: StateLayout, supervisor: int, supervised: dict[str, dict[str, object]]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.stack_file.write_text(json.dumps({"supervisor_pid": supervisor, "supervised": supervised}))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture()
def layout(tmp_path: Path) -> StateLayout:
    return StateLayout(tmp_path / "state")


def test_status_lines_show_each_part_and_its_restarts(layout: StateLayout) -> None:
    restarted = datetime(2026, 11, 30, 12, 3, 4, tzinfo=UTC)
    _write(
        layout,
        os.getpid(),
        {
            "envoy": {
                "pid": os.getpid(),
                "state": "up",
                "restarts": 2,
                "last_restart": restarted.isoformat(),
                "last_exit": "was killed by SIGKILL",
            },
            "temporal": {"pid": _dead_pid(), "state": "up", "restarts": 0},
            "worker": {"pid": os.getpid(), "state": "backing off", "restarts": 1, "last_exit": "exited with status 1"},
        },
    )
    local = restarted.astimezone().strftime("%H:%M:%S")
    assert supervision_lines(layout) == [
        f"envoy: up (pid {os.getpid()}), restarted 2\N{MULTIPLICATION SIGN} (last {local}, was killed by SIGKILL)",
        f"temporal: down (pid {json.loads(layout.stack_file.read_text())['supervised']['temporal']['pid']})",
        f"worker: backing off (pid {os.getpid()}), restarted 1\N{MULTIPLICATION SIGN} (exited with status 1)",
    ]


def test_a_stopped_part_is_not_called_up(layout: StateLayout) -> None:
    """A SIGSTOPped worker is alive (the supervisor does not restart it) but does nothing."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not processes.is_stopped(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _write(layout, os.getpid(), {"worker": {"pid": child.pid, "state": "up", "restarts": 0}})
        assert supervision_lines(layout) == [
            f"worker: stopped (SIGSTOP: it does nothing until SIGCONT) (pid {child.pid})"
        ]
    finally:
        child.kill()
        child.wait()


def test_status_lines_when_drctl_up_is_not_running(layout: StateLayout) -> None:
    assert supervision_lines(layout) == ["drctl up: not running (no stack file)"]
    gone = _dead_pid()
    _write(layout, gone, {"envoy": {"pid": os.getpid(), "state": "up", "restarts": 0}})
    assert supervision_lines(layout) == [
        f"drctl up: not running (supervisor pid {gone} is gone; the next `drctl up` resumes)"
    ]


async def test_a_prober_not_ready_says_what_it_still_waits_for_and_the_wait_grows_with_the_fleet(
    tmp_path: Path,
) -> None:
    stack = LocalStack(isolated_settings(tmp_path / "state", EXAMPLE_POLICY), load_policy_file(EXAMPLE_POLICY), print)
    stack.with_node_agents = True
    stack.layout.logs_dir.mkdir(parents=True)
    stack.pids["prober"] = os.getpid()  # a live process: only its status file is read
    nodes = sorted(stack.node_agent_ports)
    status = {"ticks": 2, "nodes_seen": nodes[:1]}
    stack.layout.prober_status_file.write_text(json.dumps(status))
    with pytest.raises(StackError, match=f"an answer from the node agents of {', '.join(nodes[1:])}"):
        await stack._wait_prober_ready(timeout_s=0.3)
    stack.layout.prober_status_file.write_text(json.dumps({"ticks": 3, "nodes_seen": nodes}))
    await stack._wait_prober_ready(timeout_s=0.3)

    empty = stack._prober_ready_timeout_s()
    assert empty == 30.0  # three zone checks of the example policy's 10s
    with stack.platform.registry.edit() as instances:
        for n in range(2_000):
            instances[f"m-{n}"] = LocalInstance(id=f"m-{n}", model="m", role=Role.HOT)
    assert stack._prober_ready_timeout_s() == pytest.approx(empty + 20.0)
