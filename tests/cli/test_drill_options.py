"""``drctl drill`` options: a schedule no more often than every 5 minutes (each run injects a real
fault), ``--unschedule`` deletes one, and a bad option is said in the command's terms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner

from drctl.cli import drills
from drctl.cli.app import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


class Schedules:
    """A Temporal client's schedule handles: ``existing`` ids can be deleted, others are not found."""

    def __init__(self, existing: set[str]) -> None:
        self.existing = existing
        self.deleted: list[str] = []

    def get_schedule_handle(self, schedule_id: str) -> Any:
        schedules = self

        class Handle:
            async def delete(self) -> None:
                if schedule_id not in schedules.existing:
                    raise RPCError("schedule not found", RPCStatusCode.NOT_FOUND, b"")
                schedules.existing.discard(schedule_id)
                schedules.deleted.append(schedule_id)

        return Handle()


@pytest.fixture
def schedules(monkeypatch: pytest.MonkeyPatch) -> Schedules:
    fake = Schedules({"drctl-drill-pod-crash-default"})

    async def connect(*_: Any) -> Schedules:
        return fake

    monkeypatch.setattr(drills, "connect", connect)
    return fake


def drill(*args: str) -> Any:
    return CliRunner().invoke(app, ["drill", *args, "--policy", str(EXAMPLE)])


@pytest.mark.parametrize("every", ["1s", "4m"])
def test_a_drill_scheduled_more_often_than_every_5_minutes_is_refused(schedules: Schedules, every: str) -> None:
    result = drill("pod-crash", "--every", every)
    assert result.exit_code == 2, result.output
    assert f"--every {every} is too often" in result.output and "at least 5m" in result.output


def test_a_drill_scheduled_more_often_than_its_timeout_is_refused(schedules: Schedules) -> None:
    result = drill("pod-crash", "--every", "10m", "--timeout", "15m")
    assert result.exit_code == 2 and "at least --timeout (15m)" in result.output


def test_unschedule_deletes_the_drill_s_schedule(schedules: Schedules) -> None:
    result = drill("pod-crash", "--unschedule")
    assert result.exit_code == 0, result.output
    assert "drill schedule drctl-drill-pod-crash-default deleted" in result.output
    assert schedules.deleted == ["drctl-drill-pod-crash-default"]
    again = drill("pod-crash", "--unschedule")
    assert again.exit_code == 1 and "no drill schedule drctl-drill-pod-crash-default" in again.output


def test_unschedule_with_every_is_refused(schedules: Schedules) -> None:
    result = drill("pod-crash", "--unschedule", "--every", "24h")
    assert result.exit_code == 2 and "do not go together" in result.output
    assert schedules.deleted == []


def test_a_bad_rate_is_said_in_the_command_s_terms(schedules: Schedules) -> None:
    result = drill("pod-crash", "--rps", "0")
    assert result.exit_code == 2, result.output
    assert "bad option: --rps: Input should be greater than or equal to 1" in result.output
    assert "pydantic" not in result.output and "validation error" not in result.output
