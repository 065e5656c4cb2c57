"""The .bin shard format: layout, validation errors, atomic writes, file resolution."""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from muongpt import DiskFullError, MuonGPTError
from muongpt.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_VERSION,
    ShardError,
    open_shard,
    read_header,
    resolve_shards,
    write_shard,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def bench_val(tmp_path_factory) -> Path:
    """The real 2M-token bench validation shard, unpacked."""
    src = DATA / "bench" / "val_000000.bin.xz"
    if not src.is_file():
        pytest.skip(f"{src} not found (shared data absent)")
    out = tmp_path_factory.mktemp("bench") / "val_000000.bin"
    with lzma.open(src) as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def _reference_shard_bytes(tokens: list[int]) -> bytes:
    """The format spelled out with struct: 256 little-endian int32, then uint16 tokens."""
    header = struct.pack("<3i", SHARD_MAGIC, SHARD_VERSION, len(tokens)) + bytes(4 * 253)
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


def test_real_shard_header_and_tokens(bench_val):
    magic, version, count = read_header(bench_val)
    assert (magic, version, count) == (20240520, 1, 2_000_000)
    raw = bench_val.read_bytes()
    tokens = open_shard(bench_val)
    assert len(tokens) == count
    first = list(struct.unpack("<1000H", raw[HEADER_BYTES : HEADER_BYTES + 2000]))
    assert tokens[:1000].tolist() == first
    assert tokens[0] == 50256  # every document starts with end-of-text


def test_write_matches_reference_layout_and_round_trips(tmp_path, bench_val):
    tokens = open_shard(bench_val)[:5000].tolist() + [0, 65535]
    path = write_shard(tmp_path / "x.bin", np.array(tokens, dtype=np.int64))
    assert path.read_bytes() == _reference_shard_bytes(tokens)
    assert read_header(path) == (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    assert open_shard(path).tolist() == tokens


def test_empty_shard(tmp_path):
    path = write_shard(tmp_path / "empty.bin", [])
    assert read_header(path)[2] == 0
    assert len(open_shard(path)) == 0


def _corrupt(tmp_path: Path, name: str, magic=SHARD_MAGIC, version=SHARD_VERSION, count=10, n=10):
    path = tmp_path / name
    header = struct.pack("<3i", magic, version, count) + bytes(4 * 253)
    path.write_bytes(header + bytes(2 * n))
    return path


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"magic": 12345}, "bad magic number 12345"),
        ({"version": 7}, "unsupported shard version 7"),
        ({"count": 11, "n": 10}, "header says 11 tokens"),
        ({"count": 10, "n": 12}, "header says 10 tokens"),
    ],
)
def test_bad_shards_raise_one_line_naming_the_file(tmp_path, kwargs, words):
    path = _corrupt(tmp_path, "bad.bin", **kwargs)
    for fn in (read_header, open_shard):
        with pytest.raises(ShardError) as err:
            fn(path)
        msg = str(err.value)
        assert str(path) in msg and words in msg and "\n" not in msg
    assert issubclass(ShardError, MuonGPTError)


def test_truncated_and_missing_files(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(100))
    with pytest.raises(ShardError, match="shorter than the 1024-byte header"):
        read_header(short)
    with pytest.raises(ShardError, match="shard not found"):
        read_header(tmp_path / "nope.bin")


def test_bad_ids_are_refused_before_writing(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 2, 3])
    before = path.read_bytes()
    with pytest.raises(ShardError, match="65535"):
        write_shard(path, [1, 70000])
    with pytest.raises(ShardError):
        write_shard(path, [-1, 5])
    assert path.read_bytes() == before


def test_failed_write_leaves_existing_shard_intact(tmp_path, monkeypatch):
    # The disk fills up after the new tokens were written, before they are durable: the old
    # shard must still be whole (a write in place would have overwritten it by then).
    path = write_shard(tmp_path / "s.bin", [1, 2, 3])
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError) as info:
        write_shard(path, list(range(1000)))
    monkeypatch.undo()
    assert str(info.value) == f"{path}: no space left on device; free some space and rerun"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no temporary left behind


def test_resolve_shards(tmp_path):
    for name in ("train_000002.bin", "train_000001.bin", "val_000000.bin"):
        write_shard(tmp_path / name, [1, 2])
    (tmp_path / "notes.txt").write_text("not a shard")
    assert [p.name for p in resolve_shards(tmp_path)] == [
        "train_000001.bin",
        "train_000002.bin",
        "val_000000.bin",
    ]
    assert [p.name for p in resolve_shards(tmp_path / "train_*.bin")] == [
        "train_000001.bin",
        "train_000002.bin",
    ]
    with pytest.raises(ShardError, match="no shard files match"):
        resolve_shards(tmp_path / "fineweb_*.bin")
