"""Muon: momentum, orthogonalized by Newton-Schulz (Jordan et al. 2024).

For every matrix W with gradient G, one step is

    m <- beta m + (1 - beta) G                      # the only state: one fp32 buffer per matrix
    u <- (1 - beta) G + beta m   if nesterov else m
    O <- newton_schulz(u)                           # ~ U V^T of u = U S V^T
    W <- (1 - lr wd) W - lr * scale * O             # decoupled weight decay

with scale = sqrt(max(1, rows/cols)) ("spectral", the update's spectral norm scales with
sqrt(fan_out/fan_in)) or 0.2 * sqrt(max(rows, cols)) ("match_adamw": the update's RMS matches
AdamW's ~0.2, Moonshot 2025, so AdamW learning rates carry over).

All matrices of one shape are stacked and orthogonalized in one batched call: the matmuls are the
same, but one launch sequence per shape instead of one per matrix. Parameters with more than two
dims are flattened to (shape[0], -1); scalars and vectors are refused (route them to AdamW).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from muongpt.optim.config import OptimizerError, check_lr, check_nonnegative, check_unit
from muongpt.optim.newton_schulz import coefficient_schedule, newton_schulz

SCALE_MODES = ("spectral", "match_adamw")


def update_scale(rows: int, cols: int, mode: str) -> float:
    if mode == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise OptimizerError(f"scale_mode must be one of {SCALE_MODES}, got {mode!r}")


def as_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is at least fp32 (bf16 params still get an fp32 buffer)."""
    return torch.promote_types(param.dtype, torch.float32)


def run_closure(closure) -> Any:
    """The ``torch.optim`` closure protocol: re-evaluate the loss with gradients on, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def param_list(params: Iterable, what: str) -> list:
    params = list(params)
    if not params:
        raise OptimizerError(f"{what} got an empty parameter list")
    return params


def restore_state(saved: Any, device: torch.device) -> Any:
    """A copy of saved optimizer state on `device`, keeping every tensor's saved dtype.

    torch.optim.Optimizer.load_state_dict casts floating state to the parameter's dtype; our state
    is deliberately fp32 even for bf16 parameters, so it is put back as it was saved.
    """
    if isinstance(saved, Tensor):
        return saved.to(device=device, copy=True)
    if isinstance(saved, dict):
        return {k: restore_state(v, device) for k, v in saved.items()}
    if isinstance(saved, list | tuple):
        return type(saved)(restore_state(v, device) for v in saved)
    return saved


def load_state_keep_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for pid, p in zip(saved_ids, params):
        if pid in state_dict["state"]:
            optimizer.state[p] = restore_state(state_dict["state"][pid], p.device)


class Muon(torch.optim.Optimizer):
    """Muon for matrices. ``params``: tensors, (name, tensor) pairs or param-group dicts.

    ``ns_dtype`` is the Newton-Schulz compute dtype (bf16; float64 only for exactness tests).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.05,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: str = "polar_express",
        scale_mode: str = "spectral",
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        params = param_list(params, "Muon")
        check_lr(lr, "Muon lr")
        check_unit(momentum, "Muon momentum")
        check_nonnegative(weight_decay, "Muon weight_decay")
        coefficient_schedule(ns_coefficients, 1)  # validates the name
        update_scale(1, 1, scale_mode)  # validates the mode
        if ns_steps < 1:
            raise OptimizerError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            scale_mode=scale_mode,
        )
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["params"]:
            raise OptimizerError("Muon got a parameter group with no parameters")
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                name = names[i] if names else f"param_groups[{len(self.param_groups) - 1}][{i}]"
                raise OptimizerError(
                    f"Muon only takes matrices: parameter {name!r} has shape {tuple(p.shape)}; "
                    "route scalars and vectors to AdamW"
                )
        check_lr(group["lr"], "Muon lr")
        check_unit(group["momentum"], "Muon momentum")

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[(p.shape, p.dtype, p.device)].append(p)
            for params in by_shape.values():
                self._step_same_shape(group, params)
        return loss

    def _step_same_shape(self, group: dict, params: list[Tensor]) -> None:
        beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
            bufs.append(state["momentum_buffer"])
        grads = [p.grad.to(bufs[0].dtype) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - beta)  # m <- beta m + (1 - beta) g
        updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs

        rows, cols = as_matrix_shape(params[0].shape)
        stacked = torch.stack(updates).view(len(params), rows, cols)
        ortho = newton_schulz(
            stacked, group["ns_steps"], group["ns_coefficients"], dtype=self.ns_dtype
        )
        ortho = ortho.to(params[0].dtype).view(len(params), *params[0].shape).unbind(0)

        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        scale = update_scale(rows, cols, group["scale_mode"])
        torch._foreach_add_(params, ortho, alpha=-lr * scale)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        load_state_keep_dtypes(self, state_dict)
