"""Everything that depends on the step, computed in one place.

``Schedule.at(step)`` gives the settings of one optimizer step: the lr multiplier (warmup, flat,
cooldown; optionally scaled with the step's tokens), Muon's momentum (warmed up, and
optionally cooled down at the end), the attention window (grown over the run), the number of
micro-steps (the batch ramp), the training rows' length (the row-length schedule) and whether a
tied embedding and head are still one weight. The trainer applies them once per step; the pure
functions below are the math of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from muongpt import MuonGPTError

COOLDOWN_SHAPES = ("linear", "sqrt")


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    final_lr_frac: float = 0.0,
    cooldown_shape: str = "linear",
) -> float:
    """Trapezoid: linear warmup, constant 1, cooldown to ``final_lr_frac``.

    Warmup gives (step + 1) / warmup_steps for step < warmup_steps (0 -> 1, never a wasted zero-lr
    step). Over the last ``cooldown_steps`` steps, with p the share of the cooldown done (0 where it
    starts, 1 at step == total_steps), the multiplier is f + (1 - f) (1 - p) (``linear``) or
    f + (1 - f) (1 - sqrt(p)) (``sqrt``: lower sooner, flatter at the end; Hägele et al. 2024,
    arXiv:2405.18392), f = ``final_lr_frac``.
    """
    if total_steps < 1:
        raise MuonGPTError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or cooldown_steps < 0:
        raise MuonGPTError(
            f"warmup_steps and cooldown_steps must be >= 0, got {warmup_steps}, {cooldown_steps}"
        )
    if warmup_steps + cooldown_steps > total_steps:
        raise MuonGPTError(
            f"warmup_steps + cooldown_steps ({warmup_steps} + {cooldown_steps}) exceed "
            f"total_steps ({total_steps})"
        )
    if not 0.0 <= final_lr_frac <= 1.0:
        raise MuonGPTError(f"final_lr_frac must be in [0, 1], got {final_lr_frac}")
    if cooldown_shape not in COOLDOWN_SHAPES:
        raise MuonGPTError(
            f"training.cooldown_shape must be one of {list(COOLDOWN_SHAPES)}, got {cooldown_shape!r}"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cooldown_steps == 0 or step < total_steps - cooldown_steps:
        return 1.0
    remaining = max(total_steps - step, 0) / cooldown_steps  # 1 at the start, 0 at the end
    if cooldown_shape == "sqrt":
        remaining = 1.0 - math.sqrt(1.0 - remaining)
    return final_lr_frac + (1.0 - final_lr_frac) * remaining


def muon_momentum(
    step: int,
    start: float = 0.85,
    end: float = 0.95,
    warmup_steps: int = 300,
    cooldown_steps: int = 0,
    total_steps: int = 0,
) -> float:
    """Momentum warmed up linearly from ``start`` to ``end`` over ``warmup_steps`` steps and,
    over the last ``cooldown_steps`` of ``total_steps``, cooled linearly back towards ``start``
    (reached at step == total_steps); where the two ramps overlap, the lower one holds. Less
    momentum at the end of the run averages the last, small-lr updates over fewer gradients."""
    frac = 1.0 if warmup_steps <= 0 else min(max(step, 0) / warmup_steps, 1.0)
    momentum = (1.0 - frac) * start + frac * end
    if cooldown_steps > 0 and step > total_steps - cooldown_steps:
        # 1 where the cooldown starts, 0 at the end of the run
        left = max(total_steps - step, 0) / cooldown_steps
        momentum = min(momentum, start + left * (end - start))
    return momentum


def attention_window(step: int, total_steps: int, start: int, end: int, block: int = 128) -> int:
    """Sliding-window length grown linearly from ``start`` to ``end`` tokens over the run.

    Rounded to whole ``block``-token tiles (at least one), so that every FlexAttention block is
    entirely inside the window or entirely outside it (no partial blocks at the window edge);
    the last step gets exactly ``end``. Windows shorter than one tile are not rounded.
    """
    block = block if end >= block else 1
    frac = min(max(step, 0) / max(total_steps - 1, 1), 1.0)
    if frac == 1.0:
        return end
    tokens = start + frac * (end - start)
    return max(round(tokens / block), 1) * block


def batch_rows(step: int, start: int, full: int, ramp_steps: int, unit: int = 1) -> int:
    """Sequences in optimizer step ``step``: grown linearly from ``start`` to ``full`` over
    ``ramp_steps`` steps, rounded down to whole ``unit``s (micro-batch x ranks); ``start`` = 0
    or ``ramp_steps`` = 0: always ``full``. Small early batches give more updates per token
    while the gradient noise is small next to the gradient (the critical batch grows in training)."""
    if not start or step >= ramp_steps:
        return full
    rows = start + (full - start) * max(step, 0) / ramp_steps
    return max(int(rows) // unit * unit, unit)


def row_length(step: int, total_steps: int, lengths, default: int) -> int:
    """Tokens per training row at optimizer step ``step``: ``lengths[i]`` in the i-th of
    ``n = len(lengths)`` equal slices of the run (the steps s of S with ⌊s·n/S⌋ = i), ``default``
    when ``lengths`` is empty. Shorter rows early give more updates per token while the gradient
    noise is small next to the gradient (the critical batch grows in training), as the batch ramp
    does in whole rows; this goes below one row per step."""
    if not lengths:
        return default
    return lengths[min(max(step, 0) * len(lengths) // total_steps, len(lengths) - 1)]


def phase_steps(steps: int, frac: float, total_steps: int, what: str) -> int:
    """A warmup/cooldown length: ``steps`` when > 0, else the fraction ``frac`` of the run
    (rounded), so that ``training.max_steps=N`` alone rescales an experiment's schedule."""
    if not 0 <= frac <= 1:
        raise MuonGPTError(f"training.{what}_frac must be in [0, 1], got {frac}")
    if steps < 0:
        raise MuonGPTError(f"training.{what}_steps must be >= 0, got {steps}")
    return steps if steps else round(frac * total_steps)


@dataclass(frozen=True)
class StepSettings:
    lr_scale: float  # times each group's base lr
    momentum: float | None  # Muon's momentum; None when the optimizer has none
    attn_window: int | None  # tokens; None when the window does not change
    micro_steps: int  # forward/backward passes of this step (rank-local)
    seq_len: int  # tokens per training row
    embed_head_tied: bool | None = None  # None when the model ties nothing


class Schedule:
    """The step-dependent settings of a run, from its training and optimizer configs.

    ``window_end``: the model's final attention window (``attn_window``), ``window_block``: the
    tile the window rounds to; ``unit``: sequences per micro-step over all ranks; ``tied``: the
    model ties its embedding and head (``untie_step`` is then the first step they train apart)."""

    def __init__(
        self,
        training,
        optimizer,
        unit: int,
        window_end: int = 0,
        window_block: int = 1,
        tied: bool = False,
    ):
        t = training
        self.total = t.max_steps
        self.warmup = phase_steps(t.warmup_steps, t.warmup_frac, t.max_steps, "warmup")
        self.cooldown = phase_steps(t.cooldown_steps, t.cooldown_frac, t.max_steps, "cooldown")
        if self.warmup + self.cooldown > t.max_steps:
            raise MuonGPTError(
                f"warmup + cooldown ({self.warmup} + {self.cooldown} steps) exceed "
                f"training.max_steps ({t.max_steps})"
            )
        # lr_multiplier's arguments after the step
        self.lr_args = (self.total, self.warmup, self.cooldown, t.final_lr_frac, t.cooldown_shape)
        lr_multiplier(0, *self.lr_args)  # checks
        self.lr_token_power = t.lr_token_power
        self.momentum = None
        if getattr(optimizer, "name", None) == "muon":
            cooldown = optimizer.momentum_cooldown_steps
            if not 0 <= cooldown <= t.max_steps:
                raise MuonGPTError(
                    f"optimizer.momentum_cooldown_steps must be in [0, training.max_steps = "
                    f"{t.max_steps}], got {cooldown}"
                )
            self.momentum = (
                optimizer.momentum_start,
                optimizer.momentum,
                optimizer.momentum_warmup_steps,
                cooldown,
                t.max_steps,
            )
        self.window = None
        if t.attn_window_start:
            if not window_end:
                raise MuonGPTError(
                    "training.attn_window_start needs a model with an attention window "
                    "(model=speedrun with model.attn_window > 0)"
                )
            if not 0 < t.attn_window_start <= window_end:
                raise MuonGPTError(
                    f"training.attn_window_start must be in (0, model.attn_window = "
                    f"{window_end}], got {t.attn_window_start}"
                )
            self.window = (t.attn_window_start, window_end, window_block)
        self.batch = (t.batch_size_start, t.batch_size, t.batch_ramp_steps, unit)
        if t.batch_size_start and (t.batch_size_start % unit or t.batch_size_start > t.batch_size):
            raise MuonGPTError(
                f"training.batch_size_start ({t.batch_size_start}) must be a multiple of "
                f"micro_batch_size x world size ({unit}) and at most batch_size ({t.batch_size})"
            )
        if t.batch_size_start and t.batch_ramp_steps < 1:
            raise MuonGPTError("training.batch_size_start needs training.batch_ramp_steps >= 1")
        self.row_lengths, self.seq_len = list(t.seq_len_schedule), t.seq_len
        if any(n < 1 for n in t.seq_len_schedule):
            raise MuonGPTError(
                f"training.seq_len_schedule must list row lengths >= 1, got {list(t.seq_len_schedule)}"
            )
        if len(t.seq_len_schedule) > t.max_steps:  # a part without a step: a length never used
            raise MuonGPTError(
                f"training.seq_len_schedule lists {len(t.seq_len_schedule)} row lengths, more "
                f"than training.max_steps ({t.max_steps}): each needs at least one step"
            )
        if not 0 < t.untie_embed_head_frac <= 1:
            raise MuonGPTError(
                f"training.untie_embed_head_frac must be in (0, 1], got {t.untie_embed_head_frac}"
            )
        self.untie_step = round(t.untie_embed_head_frac * t.max_steps) if tied else None

    @classmethod
    def of_model(cls, cfg, model, world_size: int = 1) -> Schedule:
        """The schedule of a run's config (``training``, ``optimizer``) for its built model: the
        attention window's end and tile, and whether it ties its embedding and head."""
        t = cfg.training
        return cls(
            t,
            cfg.optimizer,
            unit=t.micro_batch_size * world_size,
            window_end=getattr(model.config, "attn_window", 0),
            window_block=getattr(model, "window_block", 1),
            tied=model.tied_weights() is not None,
        )

    def at(self, step: int) -> StepSettings:
        lr = lr_multiplier(step, *self.lr_args)
        momentum = muon_momentum(step, *self.momentum) if self.momentum else None
        window = None
        if self.window is not None:
            start, end, block = self.window
            window = attention_window(step, self.total, start, end, block=block)
        start, full, ramp, unit = self.batch
        micro = batch_rows(step, start, full, ramp, unit) // unit
        seq_len = row_length(step, self.total, self.row_lengths, self.seq_len)
        if self.lr_token_power:  # lr ∝ tokens^p: smaller steps of a ramp or row schedule
            tokens = micro * unit * seq_len / (full * self.seq_len)
            lr *= tokens**self.lr_token_power
        tied = None if self.untie_step is None else step < self.untie_step
        return StepSettings(lr, momentum, window, micro, seq_len, tied)

    def row_length_starts(self) -> dict[int, int]:
        """{row length: the first step that trains on it}, in order of first use: slice i of
        ``row_length``'s n starts at step ⌈i·S/n⌉."""
        if not self.row_lengths:
            return {self.seq_len: 0}
        n, starts = len(self.row_lengths), {}
        for i, length in enumerate(self.row_lengths):
            starts.setdefault(length, -(-i * self.total // n))
        return starts
