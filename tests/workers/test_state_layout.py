"""Where the local platform keeps Envoy's endpoints: in this user's own folder in memory, or in the
state folder when there is no such folder to trust."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drctl.settings import StateLayout, memory_folder


def test_each_state_folder_has_its_own_folder_in_this_users_private_memory_folder(tmp_path: Path) -> None:
    memory = tmp_path / "shm"
    memory.mkdir()
    first, second = memory_folder(tmp_path / "a", memory), memory_folder(tmp_path / "b", memory)
    assert first is not None and second is not None
    assert first.parent == second.parent == memory / f"drctl-{os.getuid()}"
    assert first != second
    assert memory_folder(tmp_path / "a", memory) == first  # every part of a stack works out the same
    assert (first.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("made_by_someone", ["a link", "a folder others may enter", "a file"])
def test_a_per_user_folder_someone_else_could_write_in_is_not_used(tmp_path: Path, made_by_someone: str) -> None:
    memory = tmp_path / "shm"
    memory.mkdir()
    top = memory / f"drctl-{os.getuid()}"
    if made_by_someone == "a link":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        top.symlink_to(elsewhere)
    elif made_by_someone == "a folder others may enter":
        top.mkdir()
        top.chmod(0o777)
    else:
        top.write_text("")
    assert memory_folder(tmp_path / "state", memory) is None


def test_without_memory_to_use_the_endpoints_stay_in_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert memory_folder(tmp_path / "state", tmp_path / "no-such-memory") is None
    monkeypatch.setenv("DRCTL_MEMORY_ROOT", "none")
    kept = StateLayout(tmp_path / "kept")
    assert kept.eds_dir == kept.state_eds_dir == kept.root / "envoy" / "eds"
    monkeypatch.setenv("DRCTL_MEMORY_ROOT", str(tmp_path / "memory"))
    (tmp_path / "memory").mkdir()
    moved = StateLayout(tmp_path / "moved")
    assert moved.eds_dir.is_relative_to(tmp_path / "memory" / f"drctl-{os.getuid()}")
    monkeypatch.delenv("DRCTL_MEMORY_ROOT")
    layout = StateLayout(tmp_path / "state")
    expected = memory_folder(layout.root)
    if expected is None:
        assert layout.eds_dir == layout.state_eds_dir == layout.root / "envoy" / "eds"
    else:
        assert layout.eds_dir == expected / "eds"
        assert layout.eds_file("m") == expected / "eds" / "m" / "eds.yaml"


def test_a_resumed_fleet_takes_the_endpoints_an_earlier_drctl_kept_in_the_state_folder(tmp_path: Path) -> None:
    """Only where the memory folder has none: a file written there since is newer than the copy."""
    from drctl.platforms.local.envoy import Endpoint, copy_missing_eds, eds_file, write_eds

    state, memory = tmp_path / "state-eds", tmp_path / "memory-eds"
    write_eds(state, "kept", [Endpoint(host="127.0.0.1", port=8001, priority=0, instance="kept-0")])
    write_eds(state, "newer", [Endpoint(host="127.0.0.1", port=8002, priority=0, instance="newer-0")])
    write_eds(memory, "newer", [Endpoint(host="127.0.0.1", port=9002, priority=0, instance="newer-1")])
    assert copy_missing_eds(state, memory, ["kept", "newer", "absent"]) == ["kept"]
    assert eds_file(memory, "kept").read_text() == eds_file(state, "kept").read_text()
    assert "9002" in eds_file(memory, "newer").read_text()
    assert not eds_file(memory, "absent").exists()
    assert [p.name for p in eds_file(memory, "kept").parent.iterdir()] == ["eds.yaml"]  # no temp file left
