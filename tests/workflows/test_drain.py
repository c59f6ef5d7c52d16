"""DrainGpuWorkflow with fake activities: standbys on the GPU go first, serving ones fail over
(confirm skipped), the GPU is cordoned so nothing is placed there again."""

from __future__ import annotations

import uuid

from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import DrainGpuRequest, DrainGpuResult, Instance, Role
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from tests.workflows.fakes import FakeFleet


def on(gpu: str, iid: str, role: Role) -> Instance:
    return Instance(
        id=iid,
        model="llama-2-7b",
        role=role,
        gpu=gpu,
        node=gpu.split("/")[0],
        lb_priority={Role.SERVING: 0, Role.HOT: 1}.get(role),
    )


async def test_drain_moves_serving_away_and_never_promotes_onto_the_bad_gpu(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    bad = "gpu-node-0/0"
    fleet = FakeFleet(
        instances={
            i.id: i
            for i in (
                on(bad, "llama-2-7b-0", Role.SERVING),
                on(bad, "llama-2-7b-1", Role.HOT),
                on("gpu-node-1/0", "llama-2-7b-2", Role.HOT),
                on("gpu-node-2/0", "llama-2-7b-3", Role.COLD),
            )
        }
    )
    queue = f"drain-{uuid.uuid4()}"
    async with Worker(
        time_skipping_env.client,
        task_queue=queue,
        workflows=[DrainGpuWorkflow, FailoverWorkflow, ModelGuardianWorkflow, BudgetWorkflow],
        activities=fleet.activities(),
    ):
        result: DrainGpuResult = await time_skipping_env.client.execute_workflow(
            DrainGpuWorkflow.run,
            DrainGpuRequest(gpu=bad, reason="Xid 79"),
            id=f"drain-{uuid.uuid4()}",
            task_queue=queue,
        )
    assert fleet.cordoned == {bad}
    assert result.deleted == ["llama-2-7b-1"]
    assert result.failovers == ["llama-2-7b-0 → llama-2-7b-2 (recovered)"] and result.failed == []
    steps = fleet.steps()
    assert steps.index("delete:llama-2-7b-1") < steps.index("promote:llama-2-7b-2")
    assert "probe:llama-2-7b-0" not in steps  # the drain established the failure: no confirm probe
    assert fleet.instances["llama-2-7b-2"].role == Role.SERVING
    assert fleet.instances["llama-2-7b-0"].role == Role.FAILED
