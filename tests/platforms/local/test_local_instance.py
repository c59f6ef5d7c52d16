"""The local platform's process details (host, port, pid) live in its own records, ``LocalInstance``;
across the ``Platform`` interface it hands out and takes the shared ``Instance`` payload, which
Temporal carries through the runbooks, and looks the process up in its registry by id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError

from drctl.payloads import Instance, Role
from drctl.platforms.local import processes
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.settings import DrctlSettings


def test_a_state_file_with_host_port_and_pid_loads_and_keeps_its_format(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    shared = {"lb_priority": None, "gpu": None, "zone": None, "node": None, "note": ""}
    serving = {**shared, "id": "m-0", "model": "m", "role": "serving", "lb_priority": 0}
    cold = {**shared, "id": "m-1", "model": "m", "role": "cold"}
    written_before = [
        {**serving, "host": "127.0.0.1", "port": 18000, "pid": 4242},
        {**cold, "host": "127.0.0.1", "port": None, "pid": None},
    ]
    path.write_text(json.dumps({"epochs": {"m": 2}, "instances": written_before}))
    registry = InstanceRegistry(path)
    loaded = registry.load()
    assert all(type(i) is LocalInstance for i in loaded.values())
    m0, m1 = loaded["m-0"], loaded["m-1"]
    assert (m0.host, m0.port, m0.pid, m0.address) == ("127.0.0.1", 18000, 4242, "127.0.0.1:18000")
    assert (m1.port, m1.pid, m1.address) == (None, None, None)  # a cold standby has no process

    moved = registry.update("m-0", port=18005, pid=5)
    assert moved.address == "127.0.0.1:18005"  # the address follows the port
    raw = json.loads(path.read_text())
    assert raw["epochs"] == {"m": 2}
    # The file keeps the fields it always had (the address is derived from them, not stored).
    assert raw["instances"] == [{**written_before[0], "port": 18005, "pid": 5}, written_before[1]]


def test_a_local_instance_becomes_the_shared_payload_without_its_process() -> None:
    local = LocalInstance(id="m-0", model="m", role=Role.HOT, port=18001, pid=7, lb_priority=1, gpu="n/0")
    shared = local.to_instance()
    assert type(shared) is Instance
    assert shared.model_dump() == {
        "id": "m-0",
        "model": "m",
        "role": Role.HOT,
        "address": "127.0.0.1:18001",
        "lb_priority": 1,
        "gpu": "n/0",
        "zone": None,
        "node": None,
        "note": "",
        "created_at": None,
    }
    with pytest.raises(ValueError, match="pid"):
        Instance.model_validate({**shared.model_dump(), "pid": 7})  # the shared payload has no pid


async def test_the_platform_hands_out_plain_instances_and_looks_their_process_up_by_id(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("models:\n  - name: alpha\n    hotStandby: 1\n")
    settings = DrctlSettings(policy=policy_file, state_dir=tmp_path / "state")
    platform = LocalPlatform(settings, load_policy_file(policy_file))
    pid = processes.spawn([sys.executable, "-c", "import time; time.sleep(60)", "alpha-0"], tmp_path / "a.log")
    port = processes.pick_port("127.0.0.1", 46000, taken=[])  # nothing listens there
    try:
        with platform.registry.edit() as instances:
            instances["alpha-0"] = LocalInstance(
                id="alpha-0", model="alpha", role=Role.SERVING, port=port, pid=pid, lb_priority=0
            )
            instances["alpha-1"] = LocalInstance(id="alpha-1", model="alpha", role=Role.COLD)
        listed = await platform.list_instances("alpha")
        one = await platform.get_instance("alpha", "alpha-0")
        every = await platform.all_instances()
        assert [type(i) for i in [*listed, one, *every]] == [Instance] * 5
        assert [(i.id, i.address) for i in listed] == [("alpha-0", f"127.0.0.1:{port}"), ("alpha-1", None)]
        # What Temporal carries: no process details (a subclass would carry its own fields too).
        [payload] = pydantic_data_converter.payload_converter.to_payloads([one])
        assert set(json.loads(payload.data)) == set(Instance.model_fields)

        # The process comes from the registry: running, so the probe asks its (closed) port.
        healthy, why = await platform.probe(one)
        assert not healthy and "/health unreachable" in why, why

        with platform.registry.edit() as instances:
            del instances["alpha-0"]
        for step in (platform.probe(one), platform.eject(one, "gone"), platform.promote(one)):
            with pytest.raises(ApplicationError) as err:
                await step
            assert err.value.type == "UnknownInstance" and err.value.non_retryable, err.value
            assert "alpha-1" in str(err.value)  # naming the known ones
    finally:
        processes.terminate(pid, grace_s=0.5)
        await platform.close()


async def test_the_policy_is_parsed_again_only_when_its_file_changed(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("models:\n  - name: alpha\n    hotStandby: 1\n")
    platform = LocalPlatform(
        DrctlSettings(policy=policy_file, state_dir=tmp_path / "state"), load_policy_file(policy_file)
    )
    first = await platform.current_policy()
    assert await platform.current_policy() is first  # unchanged bytes: the same parse
    policy_file.write_text("models:\n  - name: beta\n    hotStandby: 1\n")
    changed = await platform.current_policy()
    assert changed is not first and changed.model_names == ["beta"]
    policy_file.write_text("models: [")  # a broken edit fails every time it is asked, as before
    for _ in range(2):
        with pytest.raises(PolicyError):
            await platform.current_policy()
