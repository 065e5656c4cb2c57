"""Checkpoints: written atomically, loaded without arbitrary unpickling, found again on resume.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dicts,
lists, tuples, str, int, float, bool, None), so it loads with ``torch.load(weights_only=True)``;
a file that needs anything else (a pickled class, a function call) is refused before any of it
runs. Files are named ``step_000123.pt`` inside the run's ``checkpoints/`` folder.

Every write goes to a temporary name beside the target, is fsynced, then renamed over the target
(and the folder fsynced), so a crash or kill during a save leaves the previous file intact. A
temporary left by a killed process is named ``.step_000123.pt.tmp-PID`` and ignored (and removed
on the next resume or prune, once process PID is gone). A full disk during any write is one
``DiskFullError`` naming the file ("no space left"); the previous file stays intact.

Loading checks the zip CRC32 of every record before unpickling anything, so flipped bytes are
reported as a damaged file (and skipped on resume like a truncated one) instead of loading a
silently wrong tensor. A file that is not a zip archive at all (text, zeros) is "not a muongpt
checkpoint".

``model.safetensors`` (the weights alone, for sampling and sharing) is exported next to the final
checkpoint; its metadata holds the step and the resolved config as JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from muongpt import MuonGPTError, atomic_write, error_line

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1  # bumped when the layout of the saved dict changes
EXPORT_NAME = "model.safetensors"
RESUME_KEYS = ("model", "optimizer", "loader", "step", "tokens_seen", "config")
_NAME = re.compile(r"^step_(\d+)\.(pt|dcp)$")  # .dcp: a sharded (FSDP) folder
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
_UNREADABLE = re.compile(r"^step_(\d+)\.pt\.unreadable$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a bare pickle (refused by weights_only)
_REFUSED = re.compile(r"Unsupported (global: GLOBAL [\w.]+|operand \d+|class [\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(MuonGPTError):
    pass


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def step_of(path: str | Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


# ---------------------------------------------------------------- the checkpoints of a run
def _folder(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``; a path that already is a checkpoints folder is taken as it is."""
    run_dir = Path(run_dir)
    if run_dir.name == CHECKPOINT_DIR and not (run_dir / CHECKPOINT_DIR).is_dir():
        return run_dir
    return run_dir / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (by step)."""
    folder = _folder(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def is_sharded(path: Path) -> bool:
    """A ``step_NNNNNN.dcp`` folder written by ``torch.distributed.checkpoint`` (train/fsdp.py)."""
    return path.suffix == ".dcp" and path.is_dir()


def remove(path: Path) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete temporaries whose writer (the PID in their name) is gone; a live writer's stay."""
    folder = _folder(run_dir)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            remove(p)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 or less: keep all).

    Files set aside as ``.unreadable`` older than the oldest kept checkpoint go too.
    """
    remove_stale_temporaries(run_dir)
    if keep <= 0:
        return
    found = list_checkpoints(run_dir)
    for old in found[:-keep]:
        remove(old)
    kept = found[-keep:]
    if not kept:
        return
    oldest = step_of(kept[0])
    for p in _folder(run_dir).iterdir():
        m = _UNREADABLE.match(p.name)
        if m and int(m.group(1)) < oldest:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- safe loading
def _describe_load_error(e: Exception) -> str:
    text = _ANSI.sub("", str(e))
    if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower():
        m = _REFUSED.search(text)
        what = m.group(0) if m else "a non-tensor object"
        return (
            f"refused: loading it would need arbitrary unpickling ({what}); muongpt loads only "
            "tensors and plain values (torch.load weights_only=True)"
        )
    return f"unreadable or truncated checkpoint ({error_line(e)})"


def check_integrity(path: Path) -> None:
    """Refuse a file that is not torch.save's format, or whose zip records fail their CRC32."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        return  # legacy format: torch.load(weights_only=True) decides
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path}: not a muongpt checkpoint (not a torch.save file: it starts with {head!r})"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: unreadable or truncated checkpoint ({error_line(e)})"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: damaged checkpoint (CRC32 mismatch in record {bad}); "
            "its bytes changed after it was written"
        )


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely; a file that needs arbitrary unpickling is refused unexecuted.

    The zip CRCs are verified first (``check_integrity``): a damaged file is an error.
    """
    path = Path(path)
    if is_sharded(path):  # gathered into the single-process layout
        return consolidate(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    check_integrity(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the zip reader and the restricted unpickler fail in many ways
        raise CheckpointError(f"{path}: {_describe_load_error(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a muongpt checkpoint (no model weights and config)")
    if int(state.get("format", CHECKPOINT_FORMAT)) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format']} is newer than this muongpt reads "
            f"({CHECKPOINT_FORMAT}); upgrade muongpt"
        )
    return state


def read_trainer_state(path: Path) -> dict:
    """The non-sharded part of a .dcp checkpoint (its model and optimizer stay on disk)."""
    from muongpt.train.fsdp import TRAINER_FILE

    file = path / TRAINER_FILE
    if not file.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: incomplete sharded checkpoint (no .metadata or {TRAINER_FILE})"
        )
    check_integrity(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler fails in many ways
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{file}: not a muongpt checkpoint (no config)")
    if int(state.get("format", CHECKPOINT_FORMAT)) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format']} is newer than this muongpt reads"
        )
    return {**state, "model": None, "optimizer": None, "sharded": str(path)}


def consolidate(path: Path) -> dict:
    """A .dcp checkpoint as the single-process checkpoint dict (whole tensors, on the CPU)."""
    from muongpt.config import model_config, upgrade_config
    from muongpt.model import build_model
    from muongpt.optim import build_optimizer
    from muongpt.train.fsdp import load_sharded

    state = read_trainer_state(path)
    del state["sharded"]  # what it returns is a whole, single-process state
    cfg = upgrade_config(state["config"])  # a config of an older version: today's layout
    model = build_model(model_config(cfg["model"]))
    optimizer = build_optimizer(model, cfg["optimizer"])
    load_sharded(path, model, optimizer.optimizers)
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_resumable(path: str | Path, map_location="cpu") -> dict:
    """``load_checkpoint`` plus a check that the file holds a full training state (a sharded
    checkpoint's model and optimizer state stay on disk, for ``train/fsdp.load_sharded``)."""
    if is_sharded(Path(path)):
        return read_trainer_state(Path(path))
    state = load_checkpoint(path, map_location)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: cannot resume from it, it lacks {', '.join(missing)} (a weights-only file?)"
        )
    return state


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_resume_checkpoint(
    resume: str,
    run_dir: str | Path,
    *,
    warn: Callable[[str], None] = print_warning,
    move_aside: bool = True,
) -> tuple[Path, dict] | None:
    """The checkpoint ``training.resume`` names, loaded: (path, state), or None to start fresh.

    ``none``: None. ``auto``: the newest loadable checkpoint of ``run_dir`` (None if it has none).
    A file: that checkpoint (any failure is an error). A folder (a run directory or its
    checkpoints/ folder): its newest loadable checkpoint. Newer files that fail to load (truncated,
    corrupt, refused) are skipped with a warning and, if ``move_aside``, renamed to
    ``<name>.unreadable`` so later resumes and pruning do not meet them again.
    """
    if resume in ("", "none"):
        return None
    if resume == "auto":
        folder = Path(run_dir)
    else:
        given = Path(resume)
        if given.is_file() or is_sharded(given):
            return given, load_resumable(given)
        if not given.is_dir():
            raise CheckpointError(
                f"training.resume={resume}: no such checkpoint file or run directory "
                "(use none, auto, a step_NNNNNN.pt file or a run directory)"
            )
        folder = given
    candidates = list_checkpoints(folder)
    if not candidates:
        if resume == "auto":
            return None
        raise CheckpointError(f"training.resume={resume}: no step_NNNNNN.pt checkpoints there")
    for path in reversed(candidates):
        try:
            return path, load_resumable(path)
        except CheckpointError as e:
            aside = ""
            if move_aside:
                bad = path.with_name(path.name + ".unreadable")
                try:
                    os.replace(path, bad)
                    aside = f" (moved to {bad.name})"
                except OSError:
                    pass
            warn(f"skipping {e}{aside}; trying the previous checkpoint")
    raise CheckpointError(
        f"no loadable checkpoint in {_folder(folder)} ({len(candidates)} tried); "
        "remove them or start a new run directory"
    )


# ---------------------------------------------------------------- weights-only export
def export_safetensors(
    weights: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> Path:
    """Write model weights alone as safetensors (atomically); ``metadata`` is stored as JSON."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, value in weights.items():
        value = value.detach().to("cpu").contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key in seen:  # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(key)
        tensors[name] = value
    header = {"format": "muongpt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)  # safetensors creates 0600; this file is meant to be shared

    return atomic_write(path, write)


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the metadata (JSON-decoded) of a file ``export_safetensors`` wrote."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__})") from None
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return weights, meta


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Export a checkpoint's weights to safetensors (default: model.safetensors beside it)."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_name(EXPORT_NAME)
    meta = {
        "step": state.get("step"),
        "tokens_seen": state.get("tokens_seen"),
        "config": state["config"],
    }
    return export_safetensors(state["model"], out, meta)


def check_weights_fit_config(path: str | Path, config, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose model config disagrees with its tensors' shapes, before allocating.

    A crafted config (say n_embd 2**20, 1000 layers) beside small tensors would otherwise
    allocate the whole model first and die out of memory. The layer count and the embedding are
    compared directly; then every shape against the model built on the meta device (no memory).
    """
    from muongpt.model import build_model

    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    embed = weights.get("embed.weight")
    layers = {k.split(".")[1] for k in weights if k.startswith("blocks.")}
    want = (config.padded_vocab_size, config.n_embd)
    if embed is None or tuple(embed.shape) != want or len(layers) != config.n_layer:
        got = tuple(embed.shape) if embed is not None else "none"
        raise CheckpointError(
            f"{path}: its config does not fit its weights (config: {config.n_layer} layers, "
            f"embedding {want}; tensors: {len(layers)} layers, embedding {got})"
        )
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    wrong = [k for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: its config does not fit its weights ({len(wrong)} tensors differ, e.g. "
            f"{k}: config {tuple(expected[k].shape)}, file {tuple(weights[k].shape)})"
        )
