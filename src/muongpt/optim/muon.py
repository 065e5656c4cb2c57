"""Muon: momentum, orthogonalized by Newton-Schulz (Jordan et al. 2024).

For every matrix W with gradient G, one step is

    m <- beta m + (1 - beta) G                      # the only state: one fp32 buffer per matrix
    u <- (1 - beta) G + beta m   if nesterov else m
    O <- newton_schulz(u)                           # ~ U V^T of u = U S V^T
    W <- (1 - lr wd) W - lr * scale * O             # decoupled weight decay

Two options (off by default):

- ``normuon`` (NorMuon, Li et al. 2025, arXiv:2510.05491): O's neurons (rows, or columns of a
  wide matrix: the longer side) get equal step sizes. A second moment v <- beta2 v + (1 - beta2)
  mean(O^2) is kept per neuron, O <- O / sqrt(v), then O is rescaled to its Frobenius norm before
  the division. Orthogonalization equalizes singular values, not the size of each neuron's
  update; this does the latter. The rescale makes v's bias (it starts at 0) irrelevant.
- ``cautious_wd`` (Chen et al. 2025, arXiv:2510.12402): the decay only touches entries where W
  and the update have the same sign, i.e. where the step already moves W towards zero.

with scale = sqrt(max(1, rows/cols)) ("spectral", the update's spectral norm scales with
sqrt(fan_out/fan_in)) or 0.2 * sqrt(max(rows, cols)) ("match_adamw": the update's RMS matches
AdamW's ~0.2, Moonshot 2025, so AdamW learning rates carry over).

All matrices of one shape, up to a transpose, are stacked in the wide orientation (rows <= cols,
so a 3072 x 768 fc joins the 768 x 3072 projections) straight into one ``ns_dtype`` buffer
(``kernels/muon_pointwise.py`` has Triton kernels for this and for the final add, off until
timed on a GPU) and orthogonalized in one batched call: the matmuls are the same, but one
launch sequence per shape instead of one per matrix. The scale is folded into the final add, so the orthogonalized stack is
read once more, by that add. Parameters with more than two dims are flattened to (shape[0], -1);
scalars and vectors are refused (route them to AdamW).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from muongpt.kernels.muon_pointwise import apply_stack, apply_stack_torch, momentum_into_stack
from muongpt.optim.config import (
    MuonConfig,
    OptimizerError,
    check_lr,
    check_nonnegative,
    check_unit,
)
from muongpt.optim.newton_schulz import coefficient_schedule, newton_schulz

SCALE_MODES = ("spectral", "match_adamw")
ADDED_OPTIONS = ("normuon", "normuon_beta2", "cautious_wd")  # absent from older checkpoints


def update_scale(rows: int, cols: int, mode: str) -> float:
    if mode == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise OptimizerError(f"scale_mode must be one of {SCALE_MODES}, got {mode!r}")


def as_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def is_tall(shape: torch.Size) -> bool:
    rows, cols = as_matrix_shape(shape)
    return rows > cols


def wide_view(t: Tensor, tall: bool) -> Tensor:
    """A matrix (or one flattened to (shape[0], -1)) as a view in the wide orientation."""
    t = t.view(as_matrix_shape(t.shape))
    return t.mT if tall else t


def neuron_shape(rows: int, cols: int) -> tuple[int, int]:
    """NorMuon's second moment: one entry per row, or per column where columns are more."""
    return (rows, 1) if rows >= cols else (1, cols)


def normalize_neurons(ortho: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon on a stack of orthogonalized updates (n, rows, cols): updates ``second_moment``
    (n, *neuron_shape) in place and returns the per-neuron normalized update (at least fp32) with
    each matrix's Frobenius norm unchanged."""
    dtype = torch.promote_types(ortho.dtype, second_moment.dtype)
    reduce_dim = -1 if second_moment.shape[-1] == 1 else -2
    # one read of the (bf16) stack, accumulated in dtype: no full-size upcast copy of it
    norm = torch.linalg.vector_norm(ortho, dim=reduce_dim, keepdim=True, dtype=dtype)
    mean_sq = norm.square() / ortho.shape[reduce_dim]
    second_moment.lerp_(mean_sq, 1 - beta2)
    inv_rms = second_moment.clamp_min(1e-20).rsqrt()
    # |O|_F^2 = size * sum(mean_sq); after the division it is size * sum(mean_sq / v)
    before = mean_sq.sum(dim=(-2, -1), keepdim=True)
    after = (mean_sq * inv_rms.square()).sum(dim=(-2, -1), keepdim=True)
    return ortho * (inv_rms * (before / after.clamp_min(1e-30)).sqrt())  # promotes to dtype


def orthogonal_update(
    u: Tensor, group: dict, ns_dtype: torch.dtype, second_moment: Tensor | None
) -> Tensor:
    """The Muon direction of a stack of momentum updates ``u`` (n, *shape): Newton-Schulz, then
    NorMuon if ``second_moment`` is given, times the shape's scale. Returns (n, rows, cols)."""
    n, (rows, cols) = u.shape[0], as_matrix_shape(u.shape[1:])
    ortho = newton_schulz(
        u.view(n, rows, cols), group["ns_steps"], group["ns_coefficients"], dtype=ns_dtype
    )
    if second_moment is not None:
        ortho = normalize_neurons(ortho, second_moment, group["normuon_beta2"])
    return ortho * update_scale(rows, cols, group["scale_mode"])


def apply_update(weights: list[Tensor], update: Tensor, group: dict, scale: float = 1.0) -> None:
    """W <- W - lr * scale * update, after the (cautious) decoupled weight decay; ``update``
    stacks one matrix per weight (any strides and dtype)."""
    lr, wd = group["lr"], group["weight_decay"]
    apply_stack_torch(weights, update, False, lr, wd, group["cautious_wd"], scale)


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
        lr: float = MuonConfig.lr,
        momentum: float = MuonConfig.momentum,
        nesterov: bool = MuonConfig.nesterov,
        weight_decay: float = MuonConfig.weight_decay,
        ns_steps: int = MuonConfig.ns_steps,
        ns_coefficients: str = MuonConfig.ns_coefficients,
        scale_mode: str = MuonConfig.scale_mode,
        normuon: bool = MuonConfig.normuon,
        normuon_beta2: float = MuonConfig.normuon_beta2,
        cautious_wd: bool = MuonConfig.cautious_wd,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        params = param_list(params, "Muon")
        check_lr(lr, "Muon lr")
        check_unit(momentum, "Muon momentum")
        check_nonnegative(weight_decay, "Muon weight_decay")
        check_unit(normuon_beta2, "Muon normuon_beta2")
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
            normuon=normuon,
            normuon_beta2=normuon_beta2,
            cautious_wd=cautious_wd,
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
                    wide = tuple(sorted(as_matrix_shape(p.shape)))
                    by_shape[(wide, p.dtype, p.device)].append(p)
            for params in by_shape.values():
                self._step_same_shape(group, params)
        return loss

    def _step_same_shape(self, group: dict, params: list[Tensor]) -> None:
        """One stack of matrices with the same wide shape: the wide ones first, then the tall."""
        beta = group["momentum"]
        params = sorted(params, key=lambda p: is_tall(p.shape))  # stable: keeps the order
        talls = [is_tall(p.shape) for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
            if group["normuon"] and "second_moment" not in state:
                state["second_moment"] = torch.zeros(
                    neuron_shape(*as_matrix_shape(p.shape)), dtype=state_dtype(p), device=p.device
                )
        bufs = [s["momentum_buffer"] for s in states]
        grads = [p.grad.to(bufs[0].dtype) for p in params]
        # m <- beta m + (1 - beta) g, and the Newton-Schulz input u (Nesterov's, or m) written
        # into one ns_dtype stack in the wide orientation
        n_wide = talls.count(False)
        wide = wide_view(params[0], talls[0]).shape
        stack = torch.empty(len(params), *wide, dtype=self.ns_dtype, device=params[0].device)
        momentum_into_stack(grads, bufs, stack, n_wide, beta, group["nesterov"])
        ortho = newton_schulz(
            stack, group["ns_steps"], group["ns_coefficients"], dtype=self.ns_dtype
        )
        if group["normuon"]:  # wide orientation: the neurons are the columns (or rows if square)
            moments = [wide_view(s["second_moment"], t) for s, t in zip(states, talls)]
            second_moment = torch.stack(moments)
            ortho = normalize_neurons(ortho, second_moment, group["normuon_beta2"])
            torch._foreach_copy_(moments, list(second_moment.unbind(0)))

        for part, tall in ((slice(0, n_wide), False), (slice(n_wide, None), True)):
            weights = params[part]
            if weights:
                scale = update_scale(*as_matrix_shape(weights[0].shape), group["scale_mode"])
                lr, wd, cautious = group["lr"], group["weight_decay"], group["cautious_wd"]
                apply_stack(weights, ortho[part], tall, lr, wd, cautious, scale)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        load_state_keep_dtypes(self, state_dict)
        fill_group_defaults(self)


def fill_group_defaults(optimizer: torch.optim.Optimizer) -> None:
    """Options added since a checkpoint was written take their defaults (torch's load replaces
    the groups with the saved ones)."""
    for group in optimizer.param_groups:
        for key in ADDED_OPTIONS:
            group.setdefault(key, optimizer.defaults[key])
