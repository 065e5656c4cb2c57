"""`muongpt data fineweb` for real through huggingface_hub, offline, against a cache built here.

The cache follows huggingface_hub's own layout (datasets--owner--name/{refs/main, blobs/<sha256>,
snapshots/<commit>/<file> -> ../../blobs/<sha256>}); the CLI runs in a subprocess because
huggingface_hub reads HF_HUB_OFFLINE when it is imported.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from muongpt.data.fineweb import REPOS, FineWebError, get_repo, shard_filenames
from muongpt.data.shards import read_header, write_shard

pytest.importorskip("huggingface_hub")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SRC = Path(__file__).resolve().parents[1] / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def real_tokens() -> np.ndarray:
    src = DATA / "bench" / "val_000000.bin.xz"
    if not src.is_file():
        pytest.skip(f"{src} not found (shared data absent)")
    with lzma.open(src) as f:  # the first 400k tokens are plenty
        raw = f.read(1024 + 2 * 400_000)
    return np.frombuffer(raw[1024:], dtype="<u2")


def build_hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A huggingface_hub cache holding ``files`` of a dataset repo at COMMIT (refs/main)."""
    repo_dir = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()  # LFS etag = sha256
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return repo_dir


def shard_bytes(tmp_path: Path, tokens: np.ndarray) -> bytes:
    return write_shard(tmp_path / "tmp_shard.bin", tokens).read_bytes()


def run_cli(hf_home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        PYTHONPATH=str(SRC),
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "muongpt.cli.data", "fineweb", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def cache(tmp_path, real_tokens):
    """fineweb10B's val shard and first two train shards, cut from real GPT-2 tokens."""
    files = {
        "fineweb_val_000000.bin": shard_bytes(tmp_path, real_tokens[:100_000]),
        "fineweb_train_000001.bin": shard_bytes(tmp_path, real_tokens[100_000:250_000]),
        "fineweb_train_000002.bin": shard_bytes(tmp_path, real_tokens[250_000:400_000]),
    }
    hf_home = tmp_path / "hf"
    build_hub_cache(hf_home, "kjj0/fineweb10B-gpt2", files)
    return hf_home, files


def test_download_from_cache_then_skip_then_repair(tmp_path, cache):
    hf_home, files = cache
    out = tmp_path / "fineweb10B"
    result = run_cli(hf_home, "--train-shards", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "3 shards" in result.stdout and "0 already present, 3 fetched" in result.stdout
    assert "file" in result.stderr  # the tqdm progress bar
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, content in files.items():
        assert (out / name).read_bytes() == content

    again = run_cli(hf_home, "--train-shards", "2", "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "3 already present, 0 fetched" in again.stdout

    # a corrupt local file is not "present and valid": it is fetched again
    broken = out / "fineweb_train_000002.bin"
    broken.unlink()  # (a hard link to the cache: replace, never write through it)
    broken.write_bytes(files["fineweb_train_000002.bin"][:5000])
    repaired = run_cli(hf_home, "--train-shards", "2", "--out", str(out), "--no-progress")
    assert repaired.returncode == 0 and "2 already present, 1 fetched" in repaired.stdout
    assert broken.read_bytes() == files["fineweb_train_000002.bin"]
    assert read_header(broken)[2] == 150_000


def test_offline_and_not_cached_is_one_line_error(tmp_path, cache):
    hf_home, files = cache
    out = tmp_path / "data"
    result = run_cli(hf_home, "--train-shards", "3", "--out", str(out), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot download fineweb_train_000003.bin")
    assert "offline" in lines[0] and "not in the cache" in lines[0]
    # what was fetched before the error stays, complete
    for name, content in files.items():
        assert (out / name).read_bytes() == content

    empty = run_cli(tmp_path / "empty_hf", "--out", str(tmp_path / "x"), "--no-progress")
    assert empty.returncode == 2 and "offline" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


def test_other_repos_and_names(tmp_path, real_tokens):
    edu = {
        "finewebedu_val_000000.bin": shard_bytes(tmp_path, real_tokens[:50_000]),
        "finewebedu_train_000001.bin": shard_bytes(tmp_path, real_tokens[50_000:90_000]),
    }
    hf_home = tmp_path / "hf"
    build_hub_cache(hf_home, "kjj0/finewebedu10B-gpt2", edu)
    out = tmp_path / "edu"
    result = run_cli(hf_home, "--repo", "finewebedu10B", "--train-shards", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == edu

    bad = run_cli(hf_home, "--repo", "fineweb1T", "--out", str(out))
    assert bad.returncode == 2 and "unknown FineWeb repository 'fineweb1T'" in bad.stderr


def test_file_names():
    fw = get_repo("kjj0/fineweb10B-gpt2")
    assert fw is REPOS["fineweb10B"]
    names = shard_filenames(fw)
    assert names[0] == "fineweb_val_000000.bin" and names[1] == "fineweb_train_000001.bin"
    assert names[-1] == "fineweb_train_000103.bin" and len(names) == 104
    assert shard_filenames(get_repo("finewebedu10B"), 2) == [
        "finewebedu_val_000000.bin",
        "finewebedu_train_000001.bin",
        "finewebedu_train_000002.bin",
    ]
    with pytest.raises(FineWebError, match=r"--train-shards must be in \[0, 103\]"):
        shard_filenames(fw, 104)
