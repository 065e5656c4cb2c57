"""What lets a run survive: RNG capture, non-finite loss guard, preemption signals, resume checks.

Preemption (SIGTERM, SIGINT): the first signal only sets a flag; the trainer sees it at the next
step boundary, saves a checkpoint, says where, and the process exits with ``EXIT_INTERRUPTED``
(75, "temporary failure: try again"); rerun with ``training.resume=auto`` and the same
``hydra.run.dir`` to continue. A second signal exits at once (128 + signal number), without
saving. With several ranks, the ranks agree on stopping at log steps (one all-reduce of a flag),
so they all stop after the same step.

Non-finite losses: see ``NonFiniteGuard``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from muongpt import MuonGPTError
from muongpt.train.checkpoint import atomic_write
from muongpt.train.distributed import DistContext

EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped by a signal, saved; rerun to resume
NO_BAD_STEP = torch.iinfo(torch.int64).max


class NonFiniteLossError(MuonGPTError):
    pass


class ConfigMismatchError(MuonGPTError):
    pass


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
    and before every checkpoint save. So a non-finite state is never saved, and the error names
    the exact first bad step even when it is noticed a few steps later.

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

    def message(self, bad_step: int, current_step: int) -> str:
        noticed = f" (noticed at step {current_step})" if current_step != bad_step else ""
        if self.last_checkpoint is not None:
            good = f"last good checkpoint: {self.last_checkpoint} (training.resume=auto)"
        else:
            good = "no checkpoint saved yet"
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
        if not ctx.enabled:
            return self.signum is not None
        if step % max(every, 1):
            return False
        flag = torch.tensor(int(self.signum is not None), device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def _say(message: str) -> None:
    # os.write, not print: a signal handler may interrupt a print to the same stream.
    os.write(2, (message + "\n").encode())


# ---------------------------------------------------------------- resume checks
# Keys under these sections that do not change the weights a checkpoint holds.
NOT_ARCHITECTURE: set[str] = set()  # model keys that do not change the weights
IGNORED_ON_RESUME = {"training.resume", "training.progress_bar"}


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, requested: dict) -> tuple[list[str], list[str]]:
    """(architecture differences, other differences) as 'key (checkpoint X, requested Y)'."""
    a, b = flatten(saved), flatten(requested)
    absent = "<absent>"
    arch, other = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, absent), b.get(key, absent)
        if old == new or key in IGNORED_ON_RESUME:
            continue
        line = f"{key} (checkpoint {old!r}, requested {new!r})"
        # A key on one side only (a setting added since the checkpoint) is listed, not refused.
        is_arch = (
            key.startswith("model.") and key not in NOT_ARCHITECTURE and absent not in (old, new)
        )
        (arch if is_arch else other).append(line)
    return arch, other


def check_resume_config(
    saved: dict, requested: dict, source: Path, log: Callable[[str], None] = print
) -> None:
    """A different model is an error; other changed settings are listed, then used."""
    from muongpt.config import upgrade_config

    arch, other = config_differences(upgrade_config(saved), requested)
    if arch:
        raise ConfigMismatchError(
            f"{source} holds a different model than requested: {'; '.join(arch)}; request the "
            "same model, or train from scratch in a new run directory (training.resume=none)"
        )
    if other:
        log(f"resuming with changed settings: {'; '.join(other)}")


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop metrics.jsonl records past ``step`` (and a torn last line); atomic. Returns dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
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
    from omegaconf import OmegaConf

    from muongpt.train import checkpoint as ckpt

    main = trainer.ctx.is_main
    found = ckpt.find_resume_checkpoint(
        resume,
        trainer.run_dir,
        warn=ckpt.print_warning if main else (lambda message: None),
        move_aside=main,
    )
    if found is None:
        if resume == "auto":
            trainer.log(f"training.resume=auto: no checkpoint in {trainer.run_dir}, starting fresh")
        return None
    path, state = found
    requested = OmegaConf.to_container(trainer.cfg, resolve=True)
    check_resume_config(state["config"], requested, path, log=trainer.log)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ckpt.CheckpointError(
            f"{path}: cannot resume from it ({type(e).__name__}: {first})"
        ) from None
    if main:
        ckpt.remove_stale_temporaries(trainer.run_dir)
        dropped = truncate_metrics(trainer.metrics_file, trainer.step)
        if dropped:
            trainer.log(f"metrics.jsonl: dropped {dropped} records past step {trainer.step}")
    trainer.guard.last_checkpoint, trainer.last_checkpoint_step = path, trainer.step
    trainer.log(f"resumed from {path}: step {trainer.step}, {trainer.tokens_seen:,} tokens seen")
    return path
