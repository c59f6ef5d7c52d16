"""LocalPlatform.probe judges each tier by its own healthy state, against real demo-server processes.

The probe asks the model's engine profile's paths (the example policy's models run the demo engine):
``/health``, which answers 200 asleep or awake as vLLM's does, and ``/is_sleeping``. A failover's
confirm step reads the probe: a warm standby that is loaded and asleep is in its normal state, and a
cold standby has no process by design; an alert for either must end as a false alarm, not eject it.
A warm standby whose process died or whose model failed is unhealthy, and so is a hot standby that
sleeps (it could not take traffic at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from drctl.payloads import Instance, Role
from drctl.platforms.local.checkpoints import corrupt_checkpoint, ensure_checkpoint
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings, StateLayout
from tests.sim.test_inference_server import MODEL, Server, demo_server

POLICY = load_policy_file(Path(__file__).resolve().parents[3] / "examples" / "dr-policy.yaml")
SIZE = POLICY.local.checkpoint_size


@pytest.fixture()
def state_dir(tmp_path: Path) -> Path:
    layout = StateLayout(tmp_path / "state")
    layout.checkpoints_dir.mkdir(parents=True)
    ensure_checkpoint(layout.checkpoint(MODEL), MODEL, SIZE)
    return layout.root


@pytest_asyncio.fixture()
async def platform(state_dir: Path) -> AsyncIterator[LocalPlatform]:
    local = LocalPlatform(DrctlSettings(state_dir=state_dir), POLICY)
    yield local
    await local.close()


@pytest.fixture()
def sleeping(state_dir: Path, tmp_path: Path) -> Iterator[Server]:
    with demo_server(StateLayout(state_dir).checkpoint(MODEL), tmp_path, "--sleeping", instance=f"{MODEL}-2") as server:
        server.wait_until("sleeping")
        yield server


def on(server: Server, role: Role, platform: LocalPlatform) -> Instance:
    """The instance the platform's registry records for ``server``'s process, as a runbook passes it
    to the platform: the shared payload, whose process the platform looks up by id."""
    port = int(server.url.rsplit(":", 1)[1])
    with platform.registry.edit() as instances:
        instances[f"{MODEL}-2"] = recorded = LocalInstance(
            id=f"{MODEL}-2", model=MODEL, role=role, port=port, pid=server.process.pid
        )
    return recorded.to_instance()


async def test_a_sleeping_warm_standby_is_healthy(platform: LocalPlatform, sleeping: Server) -> None:
    healthy, why = await platform.probe(on(sleeping, Role.WARM, platform))
    assert healthy, why
    assert why.startswith("/health ") and "loaded and asleep" in why, why
    assert sleeping.get("/is_sleeping").json() == {"is_sleeping": True}  # the probe did not wake it


async def test_a_sleeping_hot_or_serving_instance_is_not(platform: LocalPlatform, sleeping: Server) -> None:
    for role in (Role.HOT, Role.SERVING):
        healthy, why = await platform.probe(on(sleeping, role, platform))
        assert not healthy and why.startswith("/health ") and "asleep" in why, (role, why)


async def test_an_awake_warm_standby_is_healthy(platform: LocalPlatform, sleeping: Server) -> None:
    assert sleeping.post("/wake_up").status_code == 200
    assert await platform.probe(on(sleeping, Role.WARM, platform)) == (True, "/health 200, awake")


async def test_a_warm_standby_whose_process_died_is_not(platform: LocalPlatform, sleeping: Server) -> None:
    instance = on(sleeping, Role.WARM, platform)
    sleeping.process.kill()
    sleeping.process.wait(5)
    healthy, why = await platform.probe(instance)
    assert not healthy and "not running" in why


async def test_a_warm_standby_whose_model_failed_is_not(platform: LocalPlatform, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    ensure_checkpoint(bad, MODEL, SIZE)
    corrupt_checkpoint(bad, offset=SIZE // 2)
    with demo_server(bad, tmp_path, "--sleeping") as server:
        server.wait_until("failed")
        healthy, why = await platform.probe(on(server, Role.WARM, platform))
    assert not healthy and "failed" in why and "checksum" in why


async def test_a_warm_standby_still_loading_is_not(platform: LocalPlatform, state_dir: Path, tmp_path: Path) -> None:
    checkpoint = StateLayout(state_dir).checkpoint(MODEL)
    with demo_server(checkpoint, tmp_path, "--sleeping", "--load-seconds-per-gib", "100000") as server:
        healthy, why = await platform.probe(on(server, Role.WARM, platform))
    assert not healthy and "loading" in why


async def test_a_cold_standby_without_a_process_is_healthy_while_its_checkpoint_is_intact(
    platform: LocalPlatform, state_dir: Path
) -> None:
    cold = Instance(id=f"{MODEL}-3", model=MODEL, role=Role.COLD, gpu="gpu-node-1/0")
    healthy, why = await platform.probe(cold)
    assert healthy and "intact" in why, why

    checkpoint = StateLayout(state_dir).checkpoint(MODEL)
    corrupt_checkpoint(checkpoint, offset=SIZE // 3)
    healthy, why = await platform.probe(cold)
    assert not healthy and "checksum mismatch" in why

    checkpoint.write_bytes(b"short")
    healthy, why = await platform.probe(cold)
    assert not healthy and "bytes" in why

    checkpoint.unlink()
    healthy, why = await platform.probe(cold)
    assert not healthy and "unusable" in why
