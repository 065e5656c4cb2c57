"""Learning-rate, Muon-momentum and attention-window schedules, as plain functions of the step."""

from __future__ import annotations

from muongpt.optim.config import OptimizerError


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    final_lr_frac: float = 0.0,
) -> float:
    """Trapezoid: linear warmup, constant 1, linear cooldown to ``final_lr_frac``.

    Warmup gives (step + 1) / warmup_steps for step < warmup_steps (0 -> 1, never a wasted zero-lr
    step); the last ``cooldown_steps`` steps go linearly from 1 down towards ``final_lr_frac``,
    reached at step == total_steps.
    """
    if total_steps < 1:
        raise OptimizerError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or cooldown_steps < 0:
        raise OptimizerError(
            f"warmup_steps and cooldown_steps must be >= 0, got {warmup_steps}, {cooldown_steps}"
        )
    if warmup_steps + cooldown_steps > total_steps:
        raise OptimizerError(
            f"warmup_steps + cooldown_steps ({warmup_steps} + {cooldown_steps}) exceed "
            f"total_steps ({total_steps})"
        )
    if not 0.0 <= final_lr_frac <= 1.0:
        raise OptimizerError(f"final_lr_frac must be in [0, 1], got {final_lr_frac}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cooldown_steps == 0 or step < total_steps - cooldown_steps:
        return 1.0
    remaining = max(total_steps - step, 0) / cooldown_steps  # 1 at the start, 0 at the end
    return final_lr_frac + (1.0 - final_lr_frac) * remaining


def muon_momentum(
    step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300
) -> float:
    """Momentum warmed up linearly from ``start`` to ``end`` over ``warmup_steps`` steps."""
    if warmup_steps <= 0:
        return end
    frac = min(max(step, 0) / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


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


def multi_token_weights(
    step: int, total_steps: int, weights: list[float], decay: list[float]
) -> list[float]:
    """Loss weights of the extra targets t+2, t+3, ... at ``step``: weight k falls linearly from
    ``weights[k]`` to 0 at the fraction ``decay[k]`` of the run (0 then on); no ``decay``: constant.
    Predicting further ahead helps most early, while the model learns coarse statistics."""
    if not decay:
        return list(weights)
    if len(decay) != len(weights) or any(not 0 < d <= 1 for d in decay):
        raise OptimizerError(
            f"training.mtp_decay needs one fraction in (0, 1] per model.mtp_weights entry "
            f"({len(weights)}), got {list(decay)}"
        )
    frac = max(step, 0) / max(total_steps, 1)
    return [w * max(0.0, 1.0 - frac / d) for w, d in zip(weights, decay)]
