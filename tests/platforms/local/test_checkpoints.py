"""Demo checkpoints: deterministic content, a sha256sum sidecar, idempotent and atomic writes, corruption."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from drctl.platforms.local.checkpoints import (
    CHUNK_SIZE,
    CheckpointInfo,
    corrupt_checkpoint,
    ensure_checkpoint,
    file_sha256,
    read_expected_sha256,
    restore_checkpoint,
    sidecar_path,
)

SIZE = CHUNK_SIZE + 12_345  # one full chunk and a partial one


def test_writes_file_and_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "llama-2-7b.ckpt"
    info = ensure_checkpoint(path, "llama-2-7b", SIZE)

    data = path.read_bytes()
    assert len(data) == SIZE
    assert info == CheckpointInfo(path=path, size=SIZE, sha256=hashlib.sha256(data).hexdigest())
    assert sidecar_path(path) == tmp_path / "checkpoints" / "llama-2-7b.ckpt.sha256"
    assert sidecar_path(path).read_text() == f"{info.sha256}  llama-2-7b.ckpt\n"
    assert read_expected_sha256(path) == info.sha256
    assert file_sha256(path) == info.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["llama-2-7b.ckpt", "llama-2-7b.ckpt.sha256"]


def test_content_is_deterministic_per_model(tmp_path: Path) -> None:
    a = ensure_checkpoint(tmp_path / "a.ckpt", "llama-2-7b", SIZE)
    b = ensure_checkpoint(tmp_path / "b.ckpt", "llama-2-7b", SIZE)
    other = ensure_checkpoint(tmp_path / "c.ckpt", "mistral-7b", SIZE)
    short = ensure_checkpoint(tmp_path / "d.ckpt", "llama-2-7b", 1000)

    assert a.sha256 == b.sha256
    assert other.sha256 != a.sha256
    assert a.path.read_bytes()[:1000] == short.path.read_bytes()
    data = a.path.read_bytes()
    assert data[:4096] != data[CHUNK_SIZE : CHUNK_SIZE + 4096]  # chunks differ from one another
    assert len(set(data[:4096])) > 200  # looks random, not a repeated pattern


def test_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    first = ensure_checkpoint(path, "m", SIZE)
    before = (path.stat().st_ino, path.stat().st_mtime_ns, sidecar_path(path).stat().st_ino)

    assert ensure_checkpoint(path, "m", SIZE) == first
    assert (path.stat().st_ino, path.stat().st_mtime_ns, sidecar_path(path).stat().st_ino) == before


def test_rewrites_when_size_differs_or_sidecar_missing(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    ensure_checkpoint(path, "m", 5000)
    bigger = ensure_checkpoint(path, "m", 6000)
    assert path.stat().st_size == 6000
    assert read_expected_sha256(path) == bigger.sha256 == file_sha256(path)

    sidecar_path(path).unlink()
    again = ensure_checkpoint(path, "m", 6000)
    assert again == bigger
    assert read_expected_sha256(path) == bigger.sha256


def test_corrupt_changes_hash_and_survives_ensure(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    info = ensure_checkpoint(path, "m", SIZE)
    original = path.read_bytes()

    corrupt_checkpoint(path, offset=100)

    damaged = path.read_bytes()
    assert len(damaged) == SIZE
    assert damaged[:100] == original[:100]
    assert damaged[100] == original[100] ^ 0xFF
    assert file_sha256(path) != info.sha256
    assert read_expected_sha256(path) == info.sha256  # the sidecar still promises the good content
    # A plain ensure leaves the damage (drills rely on it); verify=True repairs it.
    assert ensure_checkpoint(path, "m", SIZE) == info
    assert file_sha256(path) != info.sha256
    assert ensure_checkpoint(path, "m", SIZE, verify=True) == info
    assert path.read_bytes() == original


def test_corrupt_at_end_is_clamped_and_offset_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    info = ensure_checkpoint(path, "m", 1000)
    corrupt_checkpoint(path, offset=999)
    assert path.stat().st_size == 1000
    assert file_sha256(path) != info.sha256
    with pytest.raises(ValueError, match="outside"):
        corrupt_checkpoint(path, offset=1000)


def test_empty_and_negative_sizes(tmp_path: Path) -> None:
    info = ensure_checkpoint(tmp_path / "empty.ckpt", "m", 0)
    assert info.sha256 == hashlib.sha256(b"").hexdigest()
    assert read_expected_sha256(info.path) == info.sha256
    with pytest.raises(ValueError, match="negative"):
        ensure_checkpoint(tmp_path / "neg.ckpt", "m", -1)


def test_read_expected_sha256_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    with pytest.raises(FileNotFoundError):
        read_expected_sha256(path)
    sidecar_path(path).write_text("not a checksum\n")
    with pytest.raises(ValueError, match="sha256sum"):
        read_expected_sha256(path)
    digest = "AB" * 32
    sidecar_path(path).write_text(f"{digest} *m.ckpt\n")  # binary-mode marker, upper case
    assert read_expected_sha256(path) == digest.lower()


def test_malformed_sidecar_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    info = ensure_checkpoint(path, "m", 4096)
    sidecar_path(path).write_text("garbage\n")
    assert ensure_checkpoint(path, "m", 4096) == info
    assert read_expected_sha256(path) == info.sha256


def test_files_are_world_readable(tmp_path: Path) -> None:
    info = ensure_checkpoint(tmp_path / "m.ckpt", "m", 10)
    assert os.stat(info.path).st_mode & 0o444 == 0o444


def test_restore_replaces_a_corrupted_copy_with_the_good_one(tmp_path: Path) -> None:
    good = ensure_checkpoint(tmp_path / "repo" / "m.ckpt", "m", 300_000)
    cache = ensure_checkpoint(tmp_path / "cache" / "m.ckpt", "m", 300_000)
    corrupt_checkpoint(cache.path, offset=1000)
    assert file_sha256(cache.path) != good.sha256
    restored = restore_checkpoint(good.path, cache.path)
    assert restored.sha256 == good.sha256 == file_sha256(cache.path)
    assert read_expected_sha256(cache.path) == good.sha256


def test_restore_refuses_a_good_copy_that_is_bad_itself(tmp_path: Path) -> None:
    good = ensure_checkpoint(tmp_path / "repo" / "m.ckpt", "m", 100_000)
    cache = ensure_checkpoint(tmp_path / "cache" / "m.ckpt", "m", 100_000)
    corrupt_checkpoint(cache.path)
    corrupt_checkpoint(good.path)
    with pytest.raises(ValueError, match="does not match its own checksum"):
        restore_checkpoint(good.path, cache.path)
    assert file_sha256(cache.path) != good.sha256  # left as it was
