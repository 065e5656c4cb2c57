"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, arXiv:2409.11321).

For a matrix W with gradient G (every tensor dim works the same way, see below):

    L <- s L + (1 - s) G G^T,  R <- s R + (1 - s) G^T G     # Shampoo statistics, s: shampoo_beta
    Q_L, Q_R: eigenvectors of L, R                          # the rotation
    G' = Q_L^T G Q_R                                        # gradient in the eigenbasis
    M <- b1 M + (1 - b1) G' ;  V <- b2 V + (1 - b2) G'^2    # Adam moments, in the eigenbasis
    W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * Q_L (M / (sqrt(V) + eps)) Q_R^T
    W <- W - lr * wd * W                                    # decoupled decay, after the update

The first step only initialises: it accumulates L, R from G and takes the first basis from
``eigh`` (eigenvalues descending); W does not move. Every ``precondition_frequency`` steps the
basis is refreshed by one power iteration and an orthonormalization: the columns of Q are sorted
by their estimated eigenvalue diag(Q^T L Q) (V is permuted the same way, so each entry keeps its
direction), then Q <- orth(L Q), with ``orthonormalize``: ``cholesky_qr`` (the default: Q = A R^-1
with R^T R = A^T A, twice, in float64: the QR's Q up to column signs, which SOAP's update does not
see; a matrix whose Gram matrix is not positive definite gets QR instead; a refresh 2.8x faster than
Householder on an H200 for d12) or ``qr`` (Householder QR, fp32, as the reference). M is kept in the eigenbasis, so at a refresh it is rotated back with the old basis and into
the new one (the same as keeping M in the original space and rotating it every step, at two
rotations less per step).

Speed: all tensors of one group with the same shape, dtype, device and step count are stepped as
one stack (one batched matmul per side, one batched eigh / QR), their state living in stacked
buffers that ``self.state[p]`` views. ``precondition_dtype`` is the dtype of the per-step
matmuls (the two rotations and the statistics' outer products; the refresh stays fp32):
``auto`` is bf16 on CUDA and the state dtype elsewhere.

``one_sided`` (the default; ``False`` is the reference's two-sided SOAP): only the smallest
preconditioned dim of each tensor (the last on a tie) keeps a statistic and a basis; the others
are left unrotated (for d12's 3072 x 768 MLP matrices: the 768-side only), which removes most of
the state and of the refresh.

Tensors of any rank: dim k gets its own statistic (contracting G with itself over every other dim)
unless its size exceeds ``max_precond_dim``, in which case it is left unrotated. 1-D tensors are
rotated only with ``precondition_1d``. ``merge_dims`` first reshapes a tensor by merging
consecutive dims while the product stays <= ``max_precond_dim`` (4-D ``channels_last`` tensors are
first permuted to channels-first order). ``normalize_grads`` divides each update by its RMS.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from muongpt.optim.config import (
    SOAP_BETAS,
    OptimizerError,
    SOAPConfig,
    check_betas,
    check_lr,
    check_nonnegative,
    check_unit,
)
from muongpt.optim.muon import load_state_keep_dtypes, param_list, run_closure, state_dtype

DATA_FORMATS = ("channels_first", "channels_last")
PRECONDITION_DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
ADDED_OPTIONS = ("one_sided", "precondition_dtype", "orthonormalize")  # absent from old checkpoints
# what a checkpoint without the option was stepped with, where that is not today's default
LEGACY_OPTIONS = {"one_sided": False}


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Merge consecutive dims while their product stays <= max_precond_dim."""
    out: list[int] = []
    current = 1
    for size in shape:
        if current * size <= max_precond_dim:
            current *= size
        else:
            if current > 1:
                out.append(current)
            current = size
    if current > 1 or not out:
        out.append(current)
    return tuple(out)


# ---------------------------------------------------------------- batched linear algebra
# Every tensor below is a stack: x (B, *dims), a basis or statistic of dim k (B, d_k, d_k).
def rotate(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Apply Q_k^T (or Q_k with back=True) along every dim k that has a basis, in x's dtype."""
    for k, Q in enumerate(bases):
        if Q is None:
            continue
        Q = Q.to(x.dtype)
        if x.ndim == 3 and k == 0:  # a stack of matrices: plain batched matmuls, no copies
            x = (Q if back else Q.mT) @ x
        elif x.ndim == 3:
            x = x @ (Q.mT if back else Q)
        else:
            moved = x.movedim(k + 1, -1)
            flat = moved.reshape(x.shape[0], -1, moved.shape[-1])
            x = (flat @ (Q.mT if back else Q)).reshape(moved.shape).movedim(-1, k + 1)
    return x


def accumulate(stats: list[Tensor | None], g: Tensor, beta: float) -> None:
    """stat_k <- beta stat_k + (1 - beta) G_(k) G_(k)^T, the outer product in g's dtype."""
    for k, stat in enumerate(stats):
        if stat is None:
            continue
        moved = g.movedim(k + 1, 1).reshape(g.shape[0], g.shape[k + 1], -1)
        stat.lerp_((moved @ moved.mT).to(stat.dtype), 1 - beta)


def eigenbasis(stat: Tensor) -> Tensor:
    """Eigenvectors of a stack of symmetric statistics, eigenvalues in descending order."""
    try:
        _, Q = torch.linalg.eigh(stat)
    except RuntimeError:  # rare ill-conditioned fp32 failure: redo in float64
        _, Q = torch.linalg.eigh(stat.double())
        Q = Q.to(stat.dtype)
    return Q.flip(-1)


def qr_orthonormalize(A: Tensor) -> Tensor:
    return torch.linalg.qr(A).Q


def cholesky_qr(A: Tensor) -> Tensor:
    """QR's Q (up to column signs) as A R^-1, R the Cholesky factor of A^T A; twice (CholeskyQR2),
    in float64, on A with unit columns (the same Q; near an eigenbasis they are near orthogonal,
    so the Gram matrix is well conditioned). Entries whose Gram matrix is not positive definite
    get Householder QR instead."""
    Q = A.double()
    Q = Q / Q.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    ok = torch.ones(Q.shape[:-2], dtype=torch.bool, device=Q.device)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    for _ in range(2):
        R, info = torch.linalg.cholesky_ex(Q.mT @ Q, upper=True)
        ok &= info == 0
        R = torch.where(ok[..., None, None], R, eye)  # failed entries: keep the solve finite
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    Q = Q.to(A.dtype)
    if not bool(ok.all()):  # one sync per refresh
        Q[~ok] = qr_orthonormalize(A[~ok])
    return Q


ORTHONORMALIZERS = {"qr": qr_orthonormalize, "cholesky_qr": cholesky_qr}


def permute_along(x: Tensor, dim: int, order: Tensor) -> Tensor:
    """x with its entries along ``dim`` reordered by ``order`` (B, x.shape[dim]), per stack entry."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = order.shape
    return x.gather(dim, order.view(shape).expand_as(x))


class Stack:
    """The state of same-shape tensors, stacked; each ``self.state[p]`` holds views of it."""

    def __init__(self, params: list[Tensor], exp_avg, exp_avg_sq, stats, bases, step: int):
        self.params, self.step = params, step
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq
        self.stats, self.bases = stats, bases  # per dim: (B, d, d) or None
        self.views: list[dict] = []

    @classmethod
    def from_states(cls, params: list[Tensor], states: list[dict]) -> Stack:
        """Stack the per-tensor states (after a load, or when the set of stepped tensors changed)."""

        def stacked(key: str, k: int | None = None):
            values = [s[key] if k is None else s[key][k] for s in states]
            return None if values[0] is None else torch.stack(values)

        n_dims = len(states[0]["Q"])
        return cls(
            params,
            stacked("exp_avg"),
            stacked("exp_avg_sq"),
            [stacked("GG", k) for k in range(n_dims)],
            [stacked("Q", k) for k in range(n_dims)],
            states[0]["step"],
        )

    def bind(self, states: list[dict]) -> None:
        """Make every tensor's state views of the stacks (the checkpoint format stays per tensor)."""
        self.views = []
        for i, state in enumerate(states):
            state["step"] = self.step
            state["exp_avg"], state["exp_avg_sq"] = self.exp_avg[i], self.exp_avg_sq[i]
            state["GG"] = [None if s is None else s[i] for s in self.stats]
            state["Q"] = [None if q is None else q[i] for q in self.bases]
            self.views.append(state)

    def is_bound(self, states: list[dict]) -> bool:
        return len(states) == len(self.views) and all(
            s is v and s["exp_avg"].data_ptr() == self.exp_avg[i].data_ptr()
            for i, (s, v) in enumerate(zip(states, self.views))
        )


class SOAP(torch.optim.Optimizer):
    """SOAP with the argument list and defaults of the reference implementation (``SOAPConfig``),
    plus ``one_sided``, ``precondition_dtype`` and ``orthonormalize`` (see the module doc)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = SOAPConfig.lr,
        betas: tuple[float, float] = SOAP_BETAS,
        shampoo_beta: float = SOAPConfig.shampoo_beta,
        eps: float = SOAPConfig.eps,
        weight_decay: float = SOAPConfig.weight_decay,
        precondition_frequency: int = SOAPConfig.precondition_frequency,
        max_precond_dim: int = SOAPConfig.max_precond_dim,
        merge_dims: bool = SOAPConfig.merge_dims,
        precondition_1d: bool = SOAPConfig.precondition_1d,
        normalize_grads: bool = SOAPConfig.normalize_grads,
        data_format: str = SOAPConfig.data_format,
        correct_bias: bool = SOAPConfig.correct_bias,
        one_sided: bool = SOAPConfig.one_sided,
        precondition_dtype: str = SOAPConfig.precondition_dtype,
        orthonormalize: str = SOAPConfig.orthonormalize,
    ):
        params = param_list(params, "SOAP")
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            one_sided=one_sided,
            precondition_dtype=precondition_dtype,
            orthonormalize=orthonormalize,
        )
        self.stacks: dict[tuple[int, ...], Stack] = {}  # ids of the stacked params -> their Stack
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["params"]:
            raise OptimizerError("SOAP got a parameter group with no parameters")
        check_lr(group["lr"], "SOAP lr")
        group["betas"] = check_betas(group["betas"], "SOAP betas")
        if group["shampoo_beta"] >= 0:
            check_unit(group["shampoo_beta"], "SOAP shampoo_beta")
        check_nonnegative(group["eps"], "SOAP eps")
        check_nonnegative(group["weight_decay"], "SOAP weight_decay")
        for key in ("precondition_frequency", "max_precond_dim"):
            if group[key] < 1:
                raise OptimizerError(f"SOAP {key} must be >= 1, got {group[key]}")
        choices = {
            "data_format": DATA_FORMATS,
            "precondition_dtype": tuple(PRECONDITION_DTYPES),
            "orthonormalize": tuple(ORTHONORMALIZERS),
        }
        for key, allowed in choices.items():
            if group[key] not in allowed:
                raise OptimizerError(f"SOAP {key} must be one of {allowed}, got {group[key]!r}")

    # -- shapes ----------------------------------------------------------------------------
    @staticmethod
    def _to_precond_shape(x: Tensor, group: dict) -> Tensor:
        if x.ndim == 0:
            return x.reshape(1)
        if not group["merge_dims"] or x.ndim == 1:
            return x
        if group["data_format"] == "channels_last" and x.ndim == 4:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(merged_shape(tuple(x.shape), group["max_precond_dim"]))

    @staticmethod
    def _from_precond_shape(x: Tensor, p: Tensor, group: dict) -> Tensor:
        if p.ndim <= 1 or not group["merge_dims"]:
            return x.reshape(p.shape)
        if group["data_format"] == "channels_last" and p.ndim == 4:
            n, h, w, c = p.shape
            return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return x.reshape(p.shape)

    @staticmethod
    def _preconditioned_dims(shape: tuple[int, ...], group: dict) -> list[bool]:
        """Which dims get a statistic and a basis."""
        if len(shape) == 1 and not group["precondition_1d"]:
            return [False]
        dims = [size <= group["max_precond_dim"] for size in shape]
        if group["one_sided"] and any(dims):
            smallest = min(size for size, d in zip(shape, dims) if d)
            keep = max(k for k, size in enumerate(shape) if dims[k] and size == smallest)
            dims = [k == keep for k in range(len(shape))]
        return dims

    @staticmethod
    def _shampoo_beta(group: dict) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]

    @staticmethod
    def _compute_dtype(group: dict, g: Tensor) -> torch.dtype:
        dtype = PRECONDITION_DTYPES[group.get("precondition_dtype", "auto")]
        if dtype is None:
            return torch.bfloat16 if g.is_cuda and g.dtype != torch.float64 else g.dtype
        return dtype

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            batches: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    step = self.state[p].get("step", -1) if p in self.state else -1
                    batches[(p.shape, p.dtype, p.device, step)].append(p)
            for (*_, step), params in batches.items():
                if step < 0:
                    self._init_stack(params, group)
                else:
                    self._step_stack(self._stack_of(params), group)
        return loss

    def _grads(self, params: list[Tensor], group: dict) -> Tensor:
        grads = [self._to_precond_shape(p.grad.to(state_dtype(p)), group) for p in params]
        return torch.stack(grads)

    def _init_stack(self, params: list[Tensor], group: dict) -> None:
        """First step: statistics and eigenbases only."""
        g = self._grads(params, group)
        shape = tuple(g.shape[1:])
        stats = [
            g.new_zeros(len(params), size, size) if use else None
            for size, use in zip(shape, self._preconditioned_dims(shape, group))
        ]
        accumulate(stats, g, self._shampoo_beta(group))
        bases = [None if s is None else eigenbasis(s) for s in stats]
        stack = Stack(params, torch.zeros_like(g), torch.zeros_like(g), stats, bases, step=0)
        self._remember(stack, [self.state[p] for p in params])

    def _remember(self, stack: Stack, states: list[dict]) -> None:
        ids = {id(p) for p in stack.params}
        for key in [k for k in self.stacks if ids.intersection(k)]:
            del self.stacks[key]  # no tensor is in two stacks
        stack.bind(states)
        self.stacks[tuple(id(p) for p in stack.params)] = stack

    def _stack_of(self, params: list[Tensor]) -> Stack:
        states = [self.state[p] for p in params]
        stack = self.stacks.get(tuple(id(p) for p in params))
        if stack is None or not stack.is_bound(states):
            stack = Stack.from_states(params, states)
            self._remember(stack, states)
        return stack

    def _step_stack(self, stack: Stack, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, params = group["lr"], stack.params
        stack.step += 1
        t = stack.step
        for p in params:
            self.state[p]["step"] = t

        g = self._grads(params, group)
        dtype = self._compute_dtype(group, g)
        g_low = g.to(dtype)
        bases = [None if Q is None else Q.to(dtype) for Q in stack.bases]
        g_rot = rotate(g_low, bases).to(g.dtype)
        exp_avg, exp_avg_sq = stack.exp_avg, stack.exp_avg_sq
        exp_avg.mul_(beta1).add_(g_rot, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        step_size = lr
        if group["correct_bias"]:
            step_size *= math.sqrt(1 - beta2**t) / (1 - beta1**t)
        direction = (exp_avg / (exp_avg_sq.sqrt() + group["eps"])).to(dtype)
        update = rotate(direction, bases, back=True).to(g.dtype)
        if group["normalize_grads"]:
            rms = update.square().flatten(1).mean(1).sqrt().view(-1, *[1] * (update.ndim - 1))
            update = update / (1e-30 + rms)
        updates = [
            self._from_precond_shape(u, p, group).to(p.dtype) for u, p in zip(update, params)
        ]
        torch._foreach_add_(params, updates, alpha=-step_size)
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])

        accumulate(stack.stats, g_low, self._shampoo_beta(group))
        if t % group["precondition_frequency"] == 0:
            self._refresh(stack, group)

    @staticmethod
    def _refresh(stack: Stack, group: dict) -> None:
        """One power iteration + orthonormalization per basis (fp32 or wider); V follows its
        columns, M is rotated back with the old basis and into the new one."""
        orthonormalize = ORTHONORMALIZERS[group.get("orthonormalize", "qr")]
        exp_avg = rotate(stack.exp_avg, stack.bases, back=True)
        exp_avg_sq = stack.exp_avg_sq
        for k, (stat, Q) in enumerate(zip(stack.stats, stack.bases)):
            if stat is None:
                continue
            LQ = stat @ Q
            estimated_eigenvalues = (Q * LQ).sum(-2)  # diag(Q^T L Q)
            order = torch.argsort(estimated_eigenvalues, dim=-1, descending=True)
            exp_avg_sq = permute_along(exp_avg_sq, k + 1, order)
            Q.copy_(orthonormalize(LQ.gather(-1, order[:, None, :].expand_as(LQ))))
        stack.exp_avg_sq.copy_(exp_avg_sq)
        stack.exp_avg.copy_(rotate(exp_avg, stack.bases))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        load_state_keep_dtypes(self, state_dict)
        self.stacks = {}
        for group in self.param_groups:
            for key in ADDED_OPTIONS:
                group.setdefault(key, LEGACY_OPTIONS.get(key, self.defaults[key]))
