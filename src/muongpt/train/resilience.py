"""What lets a run survive: RNG capture, non-finite loss guard, preemption signals, resume checks.

Preemption (SIGTERM, SIGINT): the first signal only sets a flag; the trainer sees it at the next
step boundary, saves a checkpoint, says where, and the process exits with ``EXIT_INTERRUPTED``
(75, "temporary failure: try again"); rerun with ``training.resume=auto`` and the same
``hydra.run.dir`` to continue. A second signal exits at once (128 + signal number), without
saving. With several ranks, the ranks agree on stopping at log steps (one all-reduce of a flag),
so they all stop after the same step.

Non-finite losses and states: see ``NonFiniteGuard``.

Run directories: a run holds an OS file lock on ``run_dir/.muongpt.lock`` while it uses the
directory (released by the kernel when the process dies, even by kill -9), so a second process
refuses at once; a fresh run (``training.resume=none``) refuses a directory that already holds
a run's checkpoints or metrics instead of mixing two runs in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from muongpt import MuonGPTError, atomic_write, error_line, full_disk_named
from muongpt.train.distributed import DistContext, any_rank

EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped by a signal, saved; rerun to resume
NO_BAD_STEP = torch.iinfo(torch.int64).max


class NonFiniteLossError(MuonGPTError):
    pass


class ConfigMismatchError(MuonGPTError):
    pass


class RunDirError(MuonGPTError):
    """A run directory that is in use, or that holds another run."""


LOCK_NAME = ".muongpt.lock"


# ---------------------------------------------------------------- RNG states
def capture_rng_state(device: torch.device) -> dict:
    """Every RNG a run may draw from, as tensors and plain values (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:  # a CPU checkpoint resumed on CUDA keeps its seed
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), device)


# ---------------------------------------------------------------- non-finite losses
class NonFiniteGuard:
    """Watches every step's loss for NaN/inf, with or without a device sync per step.

    ``max_bad_steps == 0`` (default, stop): each step folds ``isfinite(loss)`` into a device
    scalar holding the first bad step number (two tiny kernels, no host sync). The trainer reads
    it with ``first_bad_step()`` where it synchronizes anyway: at log steps, before evaluations
    and before every checkpoint save, so the error names the exact first bad step even when it
    is noticed a few steps later. A finite loss of step k does not make the weights after
    update k finite (say ``optimizer.lr=inf``), so every save also checks the tensors it would
    write (``check_state``): a non-finite state is never saved.

    ``max_bad_steps == N > 0`` (skip): whether to apply a step's update must be known on the host
    before ``optimizer.step()``: one scalar device->host copy per step (on CPU, free). A bad step's
    update is not applied (gradients dropped, optimizer state untouched; the step counter and data
    still advance); the (N+1)-th bad step stops the run.
    """

    def __init__(self, max_bad_steps: int, ctx: DistContext, log: Callable[[str], None] = print):
        if max_bad_steps < 0:
            raise MuonGPTError(f"training.max_bad_steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps, self.ctx, self.log = max_bad_steps, ctx, log
        self.bad_steps = 0  # steps skipped so far (saved in checkpoints)
        self.last_checkpoint: Path | None = None  # named in the error message
        self._first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=ctx.device)

    def observe(self, loss: torch.Tensor, step: int) -> bool:
        """Record the loss of ``step``; False means: do not apply this step's update."""
        finite = torch.isfinite(loss.detach())
        if self.max_bad_steps == 0:
            bad_step = torch.where(finite, NO_BAD_STEP, step)
            torch.minimum(self._first_bad, bad_step, out=self._first_bad)
            return True
        bad = (~finite).to(torch.int32)
        if self.ctx.enabled:  # every rank must make the same decision
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bool(bad):
            return True
        self.bad_steps += 1
        if self.bad_steps > self.max_bad_steps:
            raise NonFiniteLossError(self.message(step, step))
        self.log(
            f"step {step}: non-finite loss, update skipped "
            f"({self.bad_steps} of training.max_bad_steps={self.max_bad_steps})"
        )
        return False

    def first_bad_step(self) -> int | None:
        """The first step whose loss was not finite, over all ranks (synchronizes)."""
        first = self._first_bad.clone()
        if self.ctx.enabled:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        value = int(first)
        return None if value == NO_BAD_STEP else value

    def check(self, current_step: int) -> None:
        bad = self.first_bad_step()
        if bad is not None:
            raise NonFiniteLossError(self.message(bad, current_step))

    def check_state(self, state: dict, step: int) -> None:
        """Refuse to save a state whose weights or optimizer state hold NaN/inf (all ranks agree).

        The loss of step k is computed before update k, so a finite loss does not prove that
        the weights after update k (the ones a checkpoint of step k holds) are finite.
        """
        bad = non_finite_tensors({"model": state.get("model"), "optimizer": state.get("optimizer")})
        flag = torch.tensor(int(bool(bad)), device=self.ctx.device)
        if self.ctx.enabled:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag):
            return
        where = f"{len(bad)} tensors, e.g. {', '.join(bad[:2])}" if bad else "on another rank"
        raise NonFiniteLossError(
            f"non-finite weights or optimizer state after step {step} ({where}), not saved; "
            f"{self._good()}; lower the learning rate (optimizer.lr)"
        )

    def _good(self) -> str:
        if self.last_checkpoint is not None:
            return f"last good checkpoint: {self.last_checkpoint} (training.resume=auto)"
        return "no checkpoint saved yet"

    def message(self, bad_step: int, current_step: int) -> str:
        noticed = f" (noticed at step {current_step})" if current_step != bad_step else ""
        good = self._good()
        if self.max_bad_steps:
            return (
                f"non-finite training loss at step {bad_step}{noticed}, more than "
                f"training.max_bad_steps={self.max_bad_steps} bad steps; {good}"
            )
        return (
            f"non-finite training loss at step {bad_step}{noticed}; {good}; "
            "training.max_bad_steps=N skips up to N such steps"
        )

    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bad_steps = int(state.get("bad_steps", 0))


def non_finite_tensors(tree, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in ``tree`` holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        tree = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor: this shard
        floating = tree.is_floating_point() or tree.is_complex()
        return [prefix] if floating and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    out = []
    for key, value in items:
        out += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return out


# ---------------------------------------------------------------- run directories
class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``run_dir/.muongpt.lock``, held while a run uses the dir.

    The kernel drops it when the process exits however it dies, so a lock is never stale; the
    file keeps the holder's PID for the message a second process prints.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another muongpt run (pid "
                f"{holder}); wait for it to finish, or give this run another hydra.run.dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def holds_a_run(run_dir: str | Path, metrics_file: str | Path) -> bool:
    """Whether ``run_dir`` already has checkpoints or a non-empty metrics.jsonl."""
    from muongpt.train import checkpoint as ckpt

    metrics = Path(metrics_file)
    return bool(ckpt.list_checkpoints(run_dir)) or (
        metrics.is_file() and metrics.stat().st_size > 0
    )


def refuse_fresh_run_over(run_dir: str | Path, metrics_file: str | Path) -> None:
    """A fresh run must not write into another run's directory (its pruning would delete it)."""
    if holds_a_run(run_dir, metrics_file):
        raise RunDirError(
            f"{run_dir} already holds a run (checkpoints or metrics.jsonl); continue it with "
            "training.resume=auto, or start this run in a new directory (hydra.run.dir=NEW_DIR)"
        )


def append_metrics(path: str | Path, record: dict) -> None:
    """Append one record as a line of strict JSON (NaN/inf become null); a full disk is one line."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    line = json.dumps(clean, allow_nan=False) + "\n"
    with full_disk_named(path), open(path, "a") as f:
        f.write(line)


# ---------------------------------------------------------------- preemption
class PreemptionHandler:
    """SIGTERM/SIGINT: the first sets ``signum``; a second exits at once. See the module doc."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(f"received {name}: saving a checkpoint after this step, then exiting "
                 f"(send it again to exit at once without saving)")  # fmt: skip
        else:
            _say(f"received {name} again: exiting now without saving")
            os._exit(128 + signum)

    def should_stop(self, ctx: DistContext, step: int, every: int) -> bool:
        """True once a signal came (on any rank, when several agree at multiples of ``every``)."""
        if ctx.enabled and step % max(every, 1):
            return False
        return any_rank(self.signum is not None, ctx)


def _say(message: str) -> None:
    # os.write, not print: a signal handler may interrupt a print to the same stream.
    os.write(2, (message + "\n").encode())


# ---------------------------------------------------------------- resume checks
# Keys under these sections that do not change the weights a checkpoint holds.
NOT_ARCHITECTURE: set[str] = set()  # model keys that do not change the weights
IGNORED_ON_RESUME = {"training.resume", "training.progress_bar"}
# Changed settings that a resumed run cannot honour, and why (said beside the change).
NO_EFFECT_ON_RESUME = {
    "training.seed": "has no effect: a resumed run continues the checkpoint's random streams",
}


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, requested: dict) -> tuple[list[str], list[str], list[str]]:
    """(architecture differences, other differences, settings the checkpoint does not have):
    the first two as 'key (checkpoint X, requested Y)', the last as 'key = Y'."""
    a, b = flatten(saved), flatten(requested)
    arch, other, added = [], [], []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_ON_RESUME or (key in a and key in b and a[key] == b[key]):
            continue
        if key not in a:  # a setting added since the checkpoint: listed, not refused
            added.append(f"{key} = {b[key]!r}")
            continue
        line = f"{key} (checkpoint {a[key]!r}, requested {b.get(key, '<absent>')!r})"
        if key in NO_EFFECT_ON_RESUME:
            line += f" {NO_EFFECT_ON_RESUME[key]}"
        is_arch = key.startswith("model.") and key not in NOT_ARCHITECTURE and key in b
        (arch if is_arch else other).append(line)
    return arch, other, added


def check_resume_config(
    saved: dict, requested: dict, source: Path, log: Callable[[str], None] = print
) -> None:
    """A different model is an error; other changed settings are listed, then used; settings
    newer than the checkpoint are listed apart (at their defaults they keep its behaviour)."""
    from muongpt.config import upgrade_config

    if isinstance(saved.get("model"), dict):  # a model section of an older layout: today's
        saved = upgrade_config(saved)
    arch, other, added = config_differences(saved, requested)
    if arch:
        raise ConfigMismatchError(
            f"{source} holds a different model than requested: {'; '.join(arch)}; request the "
            "same model, or train from scratch in a new run directory (training.resume=none)"
        )
    if other:
        log(f"resuming with changed settings: {'; '.join(other)}")
    if added:
        log(f"settings newer than the checkpoint, used as requested: {'; '.join(added)}")


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop metrics.jsonl records past ``step`` (and torn lines); atomic. Returns dropped.

    ``step=-1`` drops every record (a resume that found no checkpoint starts from scratch).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise MuonGPTError(f"{path}: cannot read it ({e.strerror})") from None
    for line in lines:
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line a killed process did not finish
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return dropped


def resume_trainer(trainer, resume: str) -> Path | None:
    """Load the checkpoint ``training.resume`` names into a Trainer; returns its path or None.

    Checks the stored config against the requested one, loads every state (the Trainer's
    ``load_state_dict``), and on the main rank cuts metrics.jsonl back to the checkpoint's step
    so the file reads as one uninterrupted run.
    """
    from muongpt.train import checkpoint as ckpt

    main = trainer.ctx.is_main
    trainer.run_lock = RunDirLock(trainer.run_dir).acquire() if main else None
    try:
        return _resume(trainer, resume, main, ckpt)
    except BaseException:
        if trainer.run_lock is not None:  # the Trainer is not built: nobody else will release it
            trainer.run_lock.release()
        raise


def release_run_dir(trainer) -> None:
    """Drop the run directory lock that ``resume_trainer`` took (Trainer.close)."""
    lock = getattr(trainer, "run_lock", None)
    if lock is not None:
        lock.release()


def _resume(trainer, resume: str, main: bool, ckpt) -> Path | None:
    from omegaconf import OmegaConf

    if resume in ("", "none"):
        if main:
            refuse_fresh_run_over(trainer.run_dir, trainer.metrics_file)
        return None
    found = ckpt.find_resume_checkpoint(
        resume,
        trainer.run_dir,
        warn=ckpt.print_warning if main else (lambda message: None),
        move_aside=main,
    )
    if found is None:
        trainer.log(f"training.resume=auto: no checkpoint in {trainer.run_dir}, starting fresh")
        if main:  # records of a run killed before its first checkpoint: it starts over
            ckpt.remove_stale_temporaries(trainer.run_dir)
            dropped = truncate_metrics(trainer.metrics_file, -1)
            if dropped:
                trainer.log(f"metrics.jsonl: dropped {dropped} records of the unsaved start")
        return None
    path, state = found
    requested = OmegaConf.to_container(trainer.cfg, resolve=True)
    check_resume_config(state["config"], requested, path, log=trainer.log)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot resume from it ({error_line(e)})") from None
    if main:
        ckpt.remove_stale_temporaries(trainer.run_dir)
        dropped = truncate_metrics(trainer.metrics_file, trainer.step)
        if dropped:
            trainer.log(f"metrics.jsonl: dropped {dropped} records past step {trainer.step}")
    trainer.guard.last_checkpoint, trainer.last_checkpoint_step = path, trainer.step
    trainer.log(f"resumed from {path}: step {trainer.step}, {trainer.tokens_seen:,} tokens seen")
    return path
