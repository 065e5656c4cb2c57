"""The token shard format shared with llm.c and modded-nanogpt.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by the tokens as little-endian uint16. Shards are read memory-mapped and written
atomically (temporary name, fsync, rename) so a crash never leaves a half-written shard behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from muongpt import MuonGPTError, atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(MuonGPTError):
    """A shard file that is missing, corrupt or inconsistent."""


def read_header(path: str | Path) -> tuple[int, int, int]:
    """Return (magic, version, token_count) after validating them against the file size."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic number {magic} (expected {SHARD_MAGIC}), not a shard")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(
            f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes"
        )
    return magic, version, count


def open_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens (uint16, read-only) after validating its header."""
    _, _, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap refuses empty maps
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def write_shard(path: str | Path, tokens) -> Path:
    """Write tokens to ``path`` atomically. Token ids must fit in uint16."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(np.uint16).max):
        raise ShardError(f"{path}: token ids must lie in [0, 65535] to fit the uint16 shard format")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())

    return atomic_write(path, write)


def resolve_shards(pattern: str | Path) -> list[Path]:
    """Expand a glob (or a folder, or a single file) to a sorted list of shard paths."""
    import glob

    p = Path(os.path.expanduser(str(pattern)))
    files = sorted(p.glob("*.bin")) if p.is_dir() else sorted(map(Path, glob.glob(str(p))))
    if not files:
        raise ShardError(f"no shard files match {pattern}")
    return files
