"""Download the pre-tokenized GPT-2 FineWeb shards (the ones modded-nanogpt trains on).

Files come through huggingface_hub's own cache (so HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE and a
cache filled earlier all work as usual) and are then hard-linked into the output folder (copied
when the cache is on another file system; a hard link shares the cache's bytes, so treat the
shards as read-only). A file already in the folder with a valid shard header is skipped; a
corrupt one is replaced. Each file appears in the folder atomically.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.data.shards import ShardError, read_header


class FineWebError(MuonGPTError):
    """A FineWeb download that cannot proceed (no network, unknown repository, bad file)."""


@dataclass(frozen=True)
class FineWebRepo:
    repo_id: str
    prefix: str  # file names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...
    train_shards: int  # train shards in the repository (about 100M tokens each)


REPOS = {
    "fineweb10B": FineWebRepo("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": FineWebRepo("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": FineWebRepo("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}
DEFAULT_REPO = "fineweb10B"


def get_repo(name: str) -> FineWebRepo:
    """Look a repository up by short name (fineweb10B) or id (kjj0/fineweb10B-gpt2)."""
    for key, repo in REPOS.items():
        if name in (key, repo.repo_id):
            return repo
    known = ", ".join(f"{k} ({r.repo_id})" for k, r in REPOS.items())
    raise FineWebError(f"unknown FineWeb repository '{name}'; choose one of: {known}")


def shard_filenames(repo: FineWebRepo, train_shards: int | None = None) -> list[str]:
    """The validation shard, then the first ``train_shards`` train shards (all when None)."""
    n = repo.train_shards if train_shards is None else train_shards
    if not 0 <= n <= repo.train_shards:
        raise FineWebError(
            f"--train-shards must be in [0, {repo.train_shards}] for {repo.repo_id}, got {n}"
        )
    return [f"{repo.prefix}_val_{0:06d}.bin"] + [
        f"{repo.prefix}_train_{i:06d}.bin" for i in range(1, n + 1)
    ]


def _is_valid_shard(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def _fetch(repo: FineWebRepo, filename: str, cache_dir: str | None) -> Path:
    """Path of ``filename`` in the huggingface_hub cache, downloading it if needed."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{filename} of {repo.repo_id}"
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        path = hf_hub_download(
            repo_id=repo.repo_id, filename=filename, repo_type="dataset", cache_dir=cache_dir
        )
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            why = "offline mode is on (HF_HUB_OFFLINE=1)"
        else:
            why = "the Hugging Face Hub cannot be reached (no network?)"
        msg = f"cannot download {where}: {why} and it is not in the cache {cache}"
        raise FineWebError(msg) from None
    except (RepositoryNotFoundError, GatedRepoError):
        msg = f"dataset repository {repo.repo_id} not found or not accessible"
        raise FineWebError(msg) from None
    except EntryNotFoundError:
        raise FineWebError(f"{repo.repo_id} has no file {filename}") from None
    except (HfHubHTTPError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FineWebError(f"downloading {where} failed: {first_line}") from None
    return Path(path)


def _place(src: Path, dst: Path) -> None:
    """Hard-link (or copy) src to dst atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(os.path.realpath(src), tmp)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def download_fineweb(
    out_dir: str | Path,
    *,
    repo: str = DEFAULT_REPO,
    train_shards: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[list[Path], int]:
    """Make ``out_dir`` hold the val shard and the first train shards; return (paths, skipped)."""
    info = get_repo(repo)
    names = shard_filenames(info, train_shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    paths, skipped = [], 0
    for name in tqdm(names, desc=f"{info.repo_id}", unit="file", disable=not progress):
        target = out / name
        if _is_valid_shard(target):
            skipped += 1
        else:
            cached = _fetch(info, name, cache_dir)
            try:
                read_header(cached)
            except ShardError as e:
                raise FineWebError(f"downloaded file is not a valid shard: {e}") from None
            _place(cached, target)
        paths.append(target)
    return paths, skipped
