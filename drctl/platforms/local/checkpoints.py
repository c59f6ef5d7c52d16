"""Demo checkpoint files for the local platform.

A checkpoint is ``size`` bytes of pseudo-random content that depends only on the model name, next to
a ``<file>.sha256`` sidecar in ``sha256sum`` format. The demo server verifies the file against the
sidecar while "loading weights", so a drill that corrupts the file (``corrupt_checkpoint``) makes
every instance that loads it fail, as a bad checkpoint would on a real fleet.

Standard library only: these functions run inside activities and in tests, and must be cheap to
import.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHECKSUM_MISMATCH = "checkpoint checksum mismatch"
"""How a loader's error starts when the checkpoint does not match its sidecar (the demo server says
it; the platform turns it into ``ErrorType.CHECKPOINT_CORRUPT`` so the runbook restores a good copy)."""

CHUNK_SIZE = 1 << 20
"""Generation and hashing work in 1 MiB chunks: bounded memory for checkpoints of any size."""

_SHA256_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint on disk and the sha256 its sidecar promises."""

    path: Path
    size: int
    sha256: str


def sidecar_path(path: Path) -> Path:
    """Where the checksum of ``path`` lives: ``model.ckpt`` -> ``model.ckpt.sha256``."""
    return path.with_suffix(path.suffix + ".sha256")


def checkpoint_chunks(model: str, size: int) -> Iterator[bytes]:
    """The content of the checkpoint of ``model``, in chunks of at most ``CHUNK_SIZE`` bytes.

    Deterministic: the same model and size give the same bytes on every machine and Python version
    (Mersenne Twister seeded with an integer, and sha512). Each 1 MiB chunk is a per-model random
    block XORed with a per-chunk sha512 pattern, which is about three times faster than drawing
    every byte from the generator. The content of a shorter checkpoint is a prefix of a longer one.
    """
    if size < 0:
        raise ValueError(f"checkpoint size must not be negative, got {size}")
    seed = hashlib.sha256(f"drctl-checkpoint:{model}".encode()).digest()
    base = int.from_bytes(random.Random(int.from_bytes(seed, "big")).randbytes(CHUNK_SIZE), "little")
    index = 0
    remaining = size
    while remaining > 0:
        mask = hashlib.sha512(seed + index.to_bytes(8, "big")).digest() * (CHUNK_SIZE // 64)
        chunk = (base ^ int.from_bytes(mask, "little")).to_bytes(CHUNK_SIZE, "little")
        n = min(remaining, CHUNK_SIZE)
        yield chunk if n == CHUNK_SIZE else chunk[:n]
        remaining -= n
        index += 1


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def read_expected_sha256(path: Path) -> str:
    """The hex sha256 (lower case) that the sidecar of checkpoint ``path`` promises.

    Raises ``FileNotFoundError`` when there is no sidecar and ``ValueError`` when it is not a
    ``sha256sum`` line.
    """
    sidecar = sidecar_path(path)
    text = sidecar.read_text(encoding="utf-8").strip()
    match = _SHA256_LINE.match(text.splitlines()[0]) if text else None
    if match is None:
        raise ValueError(f"{sidecar} is not a sha256sum line ('<64 hex digits>  <file name>')")
    return match.group(1).lower()


def _atomic_write(target: Path, chunks: Iterator[bytes]) -> str:
    """Write ``chunks`` to a temp file beside ``target``, fsync it and rename it over ``target``.

    Returns the hex sha256 of what was written.
    """
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _existing(path: Path, size: int) -> CheckpointInfo | None:
    """The checkpoint already on disk when it has the right size and a readable sidecar."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            return None
        return CheckpointInfo(path=path, size=size, sha256=read_expected_sha256(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def ensure_checkpoint(path: Path, model: str, size: int, *, verify: bool = False) -> CheckpointInfo:
    """Make sure the demo checkpoint of ``model`` exists at ``path`` with ``size`` bytes and a sidecar.

    Idempotent: a file of the right size with a readable sidecar is left alone, without reading it,
    so a checkpoint that a drill corrupted in place stays corrupted. With ``verify=True`` the file is
    hashed too and rewritten when it does not match its sidecar (how a drill repairs it).

    The file and then the sidecar are each written atomically (temp file and ``os.replace``), so a
    reader never sees a half-written checkpoint.
    """
    if size < 0:
        raise ValueError(f"checkpoint size must not be negative, got {size}")
    existing = _existing(path, size)
    if existing is not None and (not verify or file_sha256(path) == existing.sha256):
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    sha256 = _atomic_write(path, checkpoint_chunks(model, size))
    _atomic_write(sidecar_path(path), iter([f"{sha256}  {path.name}\n".encode()]))
    return CheckpointInfo(path=path, size=size, sha256=sha256)


def corrupt_checkpoint(path: Path, offset: int = 0, length: int = 16) -> None:
    """Flip ``length`` bytes (XOR 0xFF) of the checkpoint in place, starting at ``offset``.

    The size and the sidecar stay the same, so ``ensure_checkpoint`` leaves the damage in place and
    the next load fails its checksum. Clamped to the end of the file; raises ``ValueError`` when
    ``offset`` is outside the file (an empty file cannot be corrupted).
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    size = path.stat().st_size
    if not 0 <= offset < size:
        raise ValueError(f"offset {offset} is outside {path} ({size} bytes)")
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(min(length, size - offset))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


def restore_checkpoint(good: Path, target: Path) -> CheckpointInfo:
    """Copy the known-good checkpoint ``good`` (and its sidecar) over ``target``, atomically.

    The good copy is hashed first and must match its own sidecar, so a restore never spreads a bad
    file; raises ``ValueError`` when it does not."""
    expected = read_expected_sha256(good)

    def chunks() -> Iterator[bytes]:
        with good.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                yield chunk

    target.parent.mkdir(parents=True, exist_ok=True)
    if file_sha256(good) != expected:
        raise ValueError(f"the good copy {good} does not match its own checksum; not restoring from it")
    sha256 = _atomic_write(target, chunks())
    _atomic_write(sidecar_path(target), iter([f"{sha256}  {target.name}\n".encode()]))
    return CheckpointInfo(path=target, size=target.stat().st_size, sha256=sha256)
