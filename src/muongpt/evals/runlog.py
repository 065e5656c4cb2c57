"""A run's evaluation log, ``RUN/evals.jsonl``: one strict-JSON line per evaluation of one of
its checkpoints, appended by ``muongpt eval`` and read by ``muongpt report`` and ``muongpt plot``.

    {"step": 300, "tokens": 307200, "checkpoint": "checkpoints/step_000300.pt",
     "eval/hellaswag": 0.2950, "eval/hellaswag_raw": 0.2810, "n": 500, "data": "...", ...}

Keys that start with ``eval/`` are the figures; the rest say what was measured.

Why a file of its own and not ``metrics.jsonl``: the trainer owns metrics.jsonl. A resume rewrites
it (the records past the checkpoint's step are dropped and the file atomically replaced), so a
line another process appended between the trainer's read and its rename would vanish; and an
evaluation of step 300 appended while a running trainer logs step 450 would break the file's step
order. The trainer never touches evals.jsonl; ``muongpt eval`` only appends to it, one whole line
per ``write`` under an exclusive ``flock`` (two evaluations finishing together cannot interleave),
so no line already written is ever lost. An evaluation stays valid after a resume: it describes
the checkpoint it names.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path

from muongpt import MuonGPTError

EVALS = "evals.jsonl"
PREFIX = "eval/"


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder of ``RUN/checkpoints/step_N.pt`` (or of its model.safetensors), else None."""
    from muongpt.train.checkpoint import CHECKPOINT_DIR

    folder = Path(checkpoint).resolve().parent
    return folder.parent if folder.name == CHECKPOINT_DIR else None


def eval_record(figures: dict, state: dict, checkpoint: Path, run_dir: Path, **about) -> dict:
    """A record: the checkpoint's step and tokens, ``eval/``-prefixed figures, and ``about``."""
    try:
        where = str(Path(checkpoint).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        where = str(checkpoint)
    record = {"step": state.get("step"), "tokens": state.get("tokens_seen"), "checkpoint": where}
    record.update({PREFIX + k: v for k, v in figures.items()})
    record.update(about)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def append_eval(run_dir: str | Path, record: dict) -> Path:
    """Append ``record`` to RUN/evals.jsonl as one line of strict JSON (NaN/inf become null)."""
    path = Path(run_dir) / EVALS
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    line = (json.dumps(clean, allow_nan=False, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
            if os.fstat(fd).st_size and not _ends_with_newline(fd):
                os.write(fd, b"\n")  # a line another process left torn stays its own line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise MuonGPTError(
            f"cannot record the result in {path} ({e.strerror or type(e).__name__}); "
            "pass --no-record to skip it"
        ) from None
    return path


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def read_evals(run_dir: str | Path) -> list[dict]:
    """The records of RUN/evals.jsonl ([] without one); a torn line is skipped, not fatal."""
    path = Path(run_dir) / EVALS
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a write that was cut short (disk full, killed): the rest still counts
        if not isinstance(record, dict):
            raise MuonGPTError(f"{path}:{number + 1}: not a JSON object")
        records.append(record)
    return records


def figures(record: dict) -> dict[str, float]:
    """The numeric ``eval/`` entries of a record."""
    return {
        k: v
        for k, v in record.items()
        if k.startswith(PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def latest(records: list[dict]) -> dict[str, float]:
    """Each ``eval/`` key's value in the record of the highest step (the later one on a tie)."""
    out: dict[str, tuple] = {}
    for i, record in enumerate(records):
        step = record.get("step")
        rank = (step if isinstance(step, (int, float)) else -math.inf, i)
        for k, v in figures(record).items():
            if k not in out or rank >= out[k][0]:
                out[k] = (rank, v)
    return {k: v for k, (_, v) in sorted(out.items())}
