"""The local registry at fleet scale: a change costs the instances it changed, not the fleet, in the
process that writes it and in every process that reads it, and what it hands out stays its own."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from drctl.payloads import ErrorType, Role
from drctl.platforms.local import registry as registry_module
from drctl.platforms.local.registry import GroupCommit, InstanceRegistry, LocalInstance


def fleet(path: Path, models: int = 3) -> InstanceRegistry:
    registry = InstanceRegistry(path)
    with registry.edit() as instances:
        for m in range(models):
            for k, role in enumerate((Role.SERVING, Role.HOT)):
                instance = LocalInstance(id=f"m{m}-{k}", model=f"m{m}", role=role, port=18000 + 2 * m + k, pid=100 + m)
                instances[instance.id] = instance
    return registry


def test_the_file_has_one_instance_per_line_and_stays_json(tmp_path: Path) -> None:
    registry = fleet(tmp_path / "instances.json")
    registry.claim_epoch("m1")
    text = (tmp_path / "instances.json").read_text()
    document = json.loads(text)
    assert document["epochs"] == {"m1": 1}
    assert [i["id"] for i in document["instances"]] == ["m0-0", "m0-1", "m1-0", "m1-1", "m2-0", "m2-1"]
    lines = [line.rstrip(",") for line in text.splitlines() if line.startswith('{"id"')]
    assert [json.loads(line)["id"] for line in lines] == [i["id"] for i in document["instances"]]


def test_another_process_sees_a_change_and_keeps_what_did_not_change(tmp_path: Path) -> None:
    writer = fleet(tmp_path / "instances.json")
    reader = InstanceRegistry(tmp_path / "instances.json")
    before = reader.view()
    writer.update("m1-0", lb_priority=0, note="promoted")
    after = reader.view()
    assert after is not before  # "changed" is still told by identity (the prober relies on it)
    assert after["m1-0"].note == "promoted" and before["m1-0"].note == ""
    assert after["m0-0"] is before["m0-0"]  # unchanged: not validated again
    assert reader.view() is after  # nothing new written: the same mapping


def test_what_the_registry_hands_out_cannot_change_what_it_keeps(tmp_path: Path) -> None:
    registry = fleet(tmp_path / "instances.json")
    updated = registry.update("m0-0", note="a")
    updated.note = "changed by the caller"
    copy = registry.get("m0-1")
    assert copy is not None
    copy.note = "changed by the caller"
    with registry.edit() as instances:
        edited = instances["m2-0"]
        edited.note = "b"
    edited.note = "changed after the edit"
    kept = registry.view()
    assert (kept["m0-0"].note, kept["m0-1"].note, kept["m2-0"].note) == ("a", "", "b")
    assert json.loads((tmp_path / "instances.json").read_text())["instances"][4]["note"] == "b"


def test_an_edit_that_fails_writes_nothing_and_leaves_the_view_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    registry = fleet(path)
    content = path.read_bytes()
    with pytest.raises(RuntimeError), registry.edit() as instances:
        instances["m0-0"].note = "half done"
        del instances["m1-1"]
        raise RuntimeError("interrupted")
    assert path.read_bytes() == content
    assert registry.view()["m0-0"].note == "" and "m1-1" in registry.view()


def test_a_fenced_update_with_an_old_epoch_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    registry = fleet(path)
    registry.claim_epoch("m0")
    registry.claim_epoch("m0")
    content = path.read_bytes()
    with pytest.raises(ApplicationError) as refused:
        registry.update("m0-0", epoch=1, lb_priority=None)
    assert refused.value.type == ErrorType.STALE_EPOCH
    assert path.read_bytes() == content


def test_a_file_in_the_older_indented_format_is_read_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    item = {"id": "m-0", "model": "m", "role": "serving", "lb_priority": 0, "gpu": None, "zone": None}
    item |= {"node": None, "note": "", "host": "127.0.0.1", "port": 18000, "pid": 7}
    path.write_text(json.dumps({"epochs": {"m": 4}, "instances": [item]}, indent=2))
    registry = InstanceRegistry(path)
    assert registry.epochs() == {"m": 4}
    registry.update("m-0", note="moved")
    assert json.loads(path.read_text())["instances"] == [{**item, "note": "moved"}]


def test_an_edit_copies_only_what_it_reads_and_keeps_the_rest(tmp_path: Path) -> None:
    registry = fleet(tmp_path / "instances.json", models=50)
    before = registry.view()
    with registry.edit() as instances:
        taken = sorted(i.port for i in instances.peek() if i.port is not None)  # looked at, not copied
        instances["m7-0"].note = "changed"
        instances["m8-1"] = instances["m8-1"].with_changes(note="replaced")
        assert instances.get("m9-0") is not before["m9-0"]  # read: a copy, free to change
        assert instances.pop("m10-1") is not before["m10-1"]
    after = registry.view()
    assert len(taken) == 100 and len(after) == 99 and "m10-1" not in after
    assert (after["m7-0"].note, after["m8-1"].note, after["m9-0"].note) == ("changed", "replaced", "")
    assert after["m20-0"] is before["m20-0"]  # never read: the registry's own object, not re-validated
    assert before["m7-0"].note == ""  # the object handed out before the edit did not change under it


def test_the_highest_index_of_each_model_outlives_its_deleted_instances(tmp_path: Path) -> None:
    registry = fleet(tmp_path / "instances.json")
    assert registry.highest_indexes() == {"m0": 1, "m1": 1, "m2": 1}
    with registry.edit() as instances:
        del instances["m1-1"]  # deleted: a new instance of m1 must not be named m1-1 again
        instances["m2-7"] = LocalInstance(id="m2-7", model="m2", role=Role.WARM, port=18100)
    assert registry.highest_indexes() == {"m0": 1, "m1": 1, "m2": 7}
    assert InstanceRegistry(tmp_path / "instances.json").highest_indexes() == registry.highest_indexes()
    assert json.loads((tmp_path / "instances.json").read_text())["indexes"] == {"m0": 1, "m1": 1, "m2": 7}


def test_a_file_from_before_the_indexes_takes_its_instances_indexes(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    fleet(path)
    document = json.loads(path.read_text())
    del document["indexes"]
    path.write_text(json.dumps(document))
    registry = InstanceRegistry(path)
    assert registry.highest_indexes() == {"m0": 1, "m1": 1, "m2": 1}
    with registry.edit() as instances:
        del instances["m0-1"]
    assert registry.highest_indexes()["m0"] == 1  # recorded at the first write, before the delete


async def test_updates_made_side_by_side_are_written_together_each_fenced_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three updates asked for in one turn of the event loop: one write of the file. The one with
    a stale epoch is refused on its own (its caller gets ``StaleEpoch``), the others land."""
    registry = fleet(tmp_path / "instances.json")
    registry.claim_epoch("m1")
    registry.claim_epoch("m1")
    writes: list[int] = []
    real_write = registry._write

    def counted(*args: object) -> None:
        writes.append(1)
        real_write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "_write", counted)
    commits = GroupCommit(registry)
    results = await asyncio.gather(
        commits.update("m0-0", note="a"),
        commits.update("m1-0", epoch=1, note="stale"),
        commits.update("m2-1", epoch=None, role=Role.PROMOTING),
        return_exceptions=True,
    )
    assert len(writes) == 1
    assert isinstance(results[0], LocalInstance) and results[0].note == "a"
    assert isinstance(results[1], ApplicationError) and results[1].type == ErrorType.STALE_EPOCH
    assert isinstance(results[2], LocalInstance) and results[2].role == Role.PROMOTING
    kept = InstanceRegistry(tmp_path / "instances.json").view()  # as another process reads it
    assert kept["m0-0"].note == "a" and kept["m1-0"].note == "" and kept["m2-1"].role == Role.PROMOTING
    # One after another (each awaited before the next is asked for): one write each.
    await commits.update("m0-0", note="b")
    await commits.update("m0-1", note="c")
    assert len(writes) == 3


async def test_epochs_claimed_side_by_side_are_written_together_and_each_is_new(tmp_path: Path) -> None:
    registry = fleet(tmp_path / "instances.json")
    commits = GroupCommit(registry)
    claimed = await asyncio.gather(commits.claim_epoch("m0"), commits.claim_epoch("m1"), commits.claim_epoch("m0"))
    assert claimed == [1, 1, 2]  # a model twice gets two epochs, in order
    assert InstanceRegistry(tmp_path / "instances.json").epochs() == {"m0": 2, "m1": 1}
    with pytest.raises(ApplicationError) as refused:
        await commits.update("m0-0", epoch=1, note="stale")
    assert refused.value.type == ErrorType.STALE_EPOCH


def test_a_read_between_a_write_and_its_end_does_not_parse_the_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write in a thread (``GroupCommit``) lets the event loop run at its rename: a read there
    sees the new file before the write has recorded it as parsed. It takes what the write put there
    instead of parsing the whole file again (at 1,000 instances, 4-5 ms for every write)."""
    registry = fleet(tmp_path / "instances.json")
    parses: list[bytes] = []
    real_parse = registry._snapshot_of

    def counted(content: bytes) -> object:
        parses.append(content)
        return real_parse(content)

    monkeypatch.setattr(registry, "_snapshot_of", counted)
    real_replace = registry_module.os.replace
    seen_in_between: list[str] = []

    def replace_then_read(src: object, dst: object) -> None:
        real_replace(src, dst)  # type: ignore[arg-type]
        seen_in_between.append(registry.view()["m1-0"].note)  # the loop, in the window

    monkeypatch.setattr(registry_module.os, "replace", replace_then_read)
    registry.update("m1-0", note="promoted")
    assert seen_in_between == ["promoted"]
    assert parses == []
    assert registry.view()["m1-0"].note == "promoted" and parses == []
    # What another process wrote is still parsed (the content is the key, not who wrote it).
    monkeypatch.setattr(registry_module.os, "replace", real_replace)
    InstanceRegistry(tmp_path / "instances.json").update("m2-0", note="elsewhere")
    assert registry.view()["m2-0"].note == "elsewhere" and len(parses) == 1


def test_a_look_at_an_unchanged_file_does_not_read_it_and_a_change_is_still_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry keeps the file of its last snapshot open and compares the path's identity
    (inode, size, time) with it: looks at an unchanged file read nothing. A write by another
    process (a new file renamed over) and an edit in place by hand are both seen."""
    path = tmp_path / "instances.json"
    registry = fleet(path)
    other = InstanceRegistry(path)
    reads: list[str] = []
    real_open = registry_module.os.open

    def counted(file: object, flags: int, *args: object) -> int:
        if str(file) == str(path):
            reads.append(str(file))
        return real_open(file, flags, *args)  # type: ignore[arg-type]

    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if str(self) == str(path):
            reads.append(str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(registry_module.os, "open", counted)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    registry.update("m0-0", note="mine")
    for _ in range(5):
        assert registry.view()["m0-0"].note == "mine"
    assert reads == []  # its own write, held open: never read back
    other.update("m1-0", note="theirs")  # another process: reads the file once, writes a new one
    reads.clear()
    assert registry.view()["m1-0"].note == "theirs" and len(reads) == 1
    assert registry.view()["m1-0"].note == "theirs" and len(reads) == 1
    # By hand, in place (the same inode): its size or time tells.
    text = path.read_text()
    with open(path, "r+") as file:
        file.write(text.replace('"note": "theirs"', '"note": "by hand, longer"'))
    assert registry.view()["m1-0"].note == "by hand, longer"
    path.unlink()
    assert dict(registry.view()) == {}


def test_the_registry_holds_one_file_open_however_often_it_is_written_and_read(tmp_path: Path) -> None:
    fds = Path("/proc/self/fd")
    registry = fleet(tmp_path / "instances.json")
    other = InstanceRegistry(tmp_path / "instances.json")
    registry.view(), other.view()
    gc.collect()  # the registries of earlier tests, and the files they hold
    before = len(list(fds.iterdir()))
    for n in range(30):
        registry.update("m0-0", note=f"n{n}")
        other.update("m1-0", note=f"n{n}")
        registry.view(), other.view()
    assert len(list(fds.iterdir())) == before
    del registry, other
    gc.collect()
    assert len(list(fds.iterdir())) == before - 2
