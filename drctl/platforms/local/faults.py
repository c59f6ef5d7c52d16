"""Fault injection on the local platform, for drills: what each scenario does to the processes
and checkpoints, and how it is undone (the node agents' fault endpoints are reached through
:mod:`drctl.platforms.node_agents`, and a reload of the weights through :mod:`drctl.platforms.weights`,
as on Kubernetes).

A "node" on the local platform is a label on processes that share one machine, so a node that is
down is simulated by stopping (SIGSTOP) every process carrying its label: the instances and the
node's agent stop answering but keep their sockets, exactly like a hung host.

Pooled instances (``DRCTL_INSTANCE_MODE=pooled``) get the same faults through their pool's control
endpoint (``processes.signal_group`` routes a signal to one of them there): a kill crashes that
instance alone, a stop hangs it alone (it accepts, never answers), a continue resumes it.
"""

from __future__ import annotations

import signal

from drctl.platforms.local import processes
from drctl.platforms.weights import DEMO as DEMO
from drctl.platforms.weights import reload_weights as reload_weights


def kill(pid: int) -> None:
    """kill -9 of one process (its group: the instance and anything it started)."""
    processes.signal_group(pid, signal.SIGKILL)


def is_pooled(pid: int) -> bool:
    """True when ``pid`` is an instance of a pool (a thread of its pool's process)."""
    return processes.pool_control_port(pid) is not None


def stop(pids: list[int]) -> list[int]:
    """SIGSTOP each running process; returns those stopped (to continue them later)."""
    return _signal_running(pids, signal.SIGSTOP)


def resume(pids: list[int]) -> list[int]:
    """SIGCONT each process still there; returns those continued."""
    return _signal_running(pids, signal.SIGCONT)


def _signal_running(pids: list[int], sig: signal.Signals) -> list[int]:
    sent = [pid for pid in pids if processes.is_alive(pid)]
    for pid in sent:
        processes.signal_group(pid, sig)
    return sent
