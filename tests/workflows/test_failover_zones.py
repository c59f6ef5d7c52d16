"""Which standby a failover promotes in an active-passive policy: an ordinary failover keeps serving
in the active zones (``failover-prefers-active-zones``), a zone failover still moves it to the
standby zone, and the listing activity tells the workflow where serving belongs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio import activity
from temporalio.client import WorkflowHistory
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from drctl.activities.failover import FailoverActivities
from drctl.payloads import (
    ActivityName,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    Instance,
    InstanceList,
    ModelRef,
    Role,
    failover_workflow_id,
)
from drctl.platforms.base import Platform
from drctl.policies.loader import PolicyError, PolicyIssue
from drctl.policies.placement import serving_zones
from drctl.policies.schema import DRPolicy
from drctl.workflows.failover import PREFERS_ACTIVE_ZONES, FailoverWorkflow
from tests.workflows.fakes import EXAMPLE_POLICY, FakeFleet

MODEL = "llama-2-7b"
NODE_OF = {"az-1": "gpu-node-0", "az-2": "gpu-node-1", "az-3": "gpu-node-2"}
"""The example policy's nodes: az-1 and az-2 active, az-3 the standby zone."""


def at(n: int, role: Role, zone: str, node: str | None = None) -> Instance:
    node = node or NODE_OF[zone]
    return Instance(
        id=f"{MODEL}-{n}",
        model=MODEL,
        role=role,
        zone=zone,
        node=node,
        gpu=f"{node}/{n}",
        lb_priority={Role.SERVING: 0, Role.HOT: 1}.get(role),
    )


def zoned_fleet(*instances: Instance) -> FakeFleet:
    return FakeFleet(instances={i.id: i for i in instances})


def two_hot_standbys() -> FakeFleet:
    """Serving in az-2; one hot standby in the standby zone (az-3, the lower id: first by the old
    order, both being away from the failed node and zone), one in the active az-1."""
    return zoned_fleet(at(0, Role.SERVING, "az-2"), at(1, Role.HOT, "az-3"), at(2, Role.HOT, "az-1"))


def listing_with_serving_zones(fleet: FakeFleet) -> list[Callable[..., Any]]:
    """The fleet's fake activities, its listing carrying the policy's serving zones as
    ``FailoverActivities.list_instances`` does (the fake of ``fakes.py`` leaves them empty)."""

    @activity.defn(name=ActivityName.LIST_INSTANCES)
    async def list_instances(ref: ModelRef) -> InstanceList:
        fleet.calls.append(("list", ref.model))
        return InstanceList(
            model=ref.model,
            instances=[i for i in fleet.instances.values() if i.model == ref.model],
            serving_zones=sorted(serving_zones(fleet.policy)),
        )

    fakes = cast(list[Callable[..., Any]], fleet.activities())
    others = [a for a in fakes if activity._Definition.must_from_callable(a).name != ActivityName.LIST_INSTANCES]
    return [*others, list_instances]


async def fail_over(
    env: WorkflowEnvironment, fleet: FakeFleet, prefer_zone: str | None = None
) -> tuple[FailoverResult, WorkflowHistory]:
    queue = f"test-{uuid.uuid4()}"
    workflow_id = f"{failover_workflow_id(MODEL, f'{MODEL}-0')}-{uuid.uuid4().hex[:6]}"
    async with Worker(
        env.client, task_queue=queue, workflows=[FailoverWorkflow], activities=listing_with_serving_zones(fleet)
    ):
        handle = await env.client.start_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model=MODEL, instance=f"{MODEL}-0", reason="test", prefer_zone=prefer_zone, epoch=1),
            id=workflow_id,
            task_queue=queue,
        )
        result = await handle.result()
        return result, await handle.fetch_history()


def patch_markers(history: WorkflowHistory) -> list[str]:
    """The ids of the patch markers the run recorded."""
    markers = [
        e.marker_recorded_event_attributes for e in history.events if e.HasField("marker_recorded_event_attributes")
    ]
    return [
        json.loads(m.details["patch-data"].payloads[0].data)["id"] for m in markers if m.marker_name == "core_patch"
    ]


async def test_an_ordinary_failover_promotes_the_hot_standby_in_an_active_zone(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = two_hot_standbys()
    result, history = await fail_over(time_skipping_env, fleet)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == f"{MODEL}-2" and fleet.instances[f"{MODEL}-2"].zone == "az-1"
    assert ("promote", f"{MODEL}-1") not in fleet.calls  # the az-3 standby is left as it was
    assert fleet.instances[f"{MODEL}-1"].role == Role.HOT
    pick = next(s for s in result.steps if s.step == "pick")
    assert pick.detail == f"candidates: {MODEL}-2 (hot), {MODEL}-1 (hot)"
    assert PREFERS_ACTIVE_ZONES in patch_markers(history)


async def test_a_zone_failover_still_prefers_the_standby_zone(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = two_hot_standbys()
    result, history = await fail_over(time_skipping_env, fleet, prefer_zone="az-3")

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == f"{MODEL}-1" and fleet.instances[f"{MODEL}-1"].zone == "az-3"
    assert PREFERS_ACTIVE_ZONES not in patch_markers(history)  # its order is as before: no patch asked


async def test_a_hot_standby_in_the_standby_zone_still_beats_a_warm_one_in_an_active_zone(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = zoned_fleet(at(0, Role.SERVING, "az-2"), at(1, Role.WARM, "az-1"), at(2, Role.HOT, "az-3"))
    result, _ = await fail_over(time_skipping_env, fleet)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == f"{MODEL}-2" and result.tier == Role.HOT


async def test_without_zone_roles_the_order_is_as_before(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = two_hot_standbys()
    failover = fleet.policy.az_failover.model_copy(update={"standby_zone": None})
    fleet.policy = fleet.policy.model_copy(update={"az_failover": failover})
    result, history = await fail_over(time_skipping_env, fleet)

    assert result.promoted == f"{MODEL}-1"  # by id: both hot standbys are away from the failed node and zone
    assert PREFERS_ACTIVE_ZONES not in patch_markers(history)


# -- the listing activity ----------------------------------------------------------------------------


class _Platform:
    """What ``list_instances`` asks of a platform."""

    def __init__(self, policy: DRPolicy | None) -> None:
        self.policy = policy

    async def list_instances(self, model: str) -> list[Instance]:
        return [at(0, Role.SERVING, "az-1"), at(1, Role.HOT, "az-3")]

    async def current_policy(self) -> DRPolicy:
        if self.policy is None:
            raise PolicyError(str(Path("policy.yaml")), [PolicyIssue("", "mapping values are not allowed here")])
        return self.policy


@pytest.mark.parametrize(
    ("policy", "zones"),
    [(EXAMPLE_POLICY, ["az-1", "az-2"]), (None, [])],
    ids=["active-passive", "policy-unreadable"],
)
async def test_the_listing_says_where_serving_belongs(policy: DRPolicy | None, zones: list[str]) -> None:
    activities = FailoverActivities(cast(Platform, _Platform(policy)))
    listed = await ActivityEnvironment().run(activities.list_instances, ModelRef(model=MODEL))
    assert [i.id for i in listed.instances] == [f"{MODEL}-0", f"{MODEL}-1"]
    assert listed.serving_zones == zones  # a policy that does not read now fails no failover
