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
basis is refreshed by one power iteration and a QR: the columns of Q are sorted by their estimated
eigenvalue diag(Q^T L Q) (V is permuted the same way, so each entry keeps its direction), then
Q <- qr(L Q). M is kept in the eigenbasis, so at a refresh it is rotated back with the old basis
and into the new one (the same as keeping M in the original space and rotating it every step, at
two rotations less per step).

Tensors of any rank: dim k gets its own statistic (contracting G with itself over every other dim)
unless its size exceeds ``max_precond_dim``, in which case it is left unrotated. 1-D tensors are
rotated only with ``precondition_1d``. ``merge_dims`` first reshapes a tensor by merging
consecutive dims while the product stays <= ``max_precond_dim`` (4-D ``channels_last`` tensors are
first permuted to channels-first order). ``normalize_grads`` divides each update by its RMS.
"""

from __future__ import annotations

import math
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


def rotate(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Apply Q_k^T (or Q_k with back=True) along every dim k that has a basis.

    Each tensordot contracts the leading dim and appends the result as the last dim, so after one
    pass over all dims they are back in their original order.
    """
    for Q in bases:
        if Q is None:
            x = x.permute(*range(1, x.ndim), 0)
        else:
            x = torch.tensordot(x, Q, dims=([0], [1 if back else 0]))
    return x


def eigenbasis(stat: Tensor) -> Tensor:
    """Eigenvectors of a symmetric statistic, eigenvalues in descending order."""
    try:
        _, Q = torch.linalg.eigh(stat)
    except RuntimeError:  # rare ill-conditioned fp32 failure: redo in float64
        _, Q = torch.linalg.eigh(stat.double())
        Q = Q.to(stat.dtype)
    return Q.flip(1)


class SOAP(torch.optim.Optimizer):
    """SOAP with the argument list and defaults of the reference implementation (``SOAPConfig``)."""

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
        )
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
        if group["data_format"] not in DATA_FORMATS:
            raise OptimizerError(
                f"SOAP data_format must be one of {DATA_FORMATS}, got {group['data_format']!r}"
            )

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

    # -- preconditioner --------------------------------------------------------------------
    @staticmethod
    def _accumulate(stats: list[Tensor | None], g: Tensor, beta: float) -> None:
        for k, stat in enumerate(stats):
            if stat is None:
                continue
            others = [d for d in range(g.ndim) if d != k]
            outer = torch.tensordot(g, g, dims=(others, others))  # G_(k) G_(k)^T
            stat.lerp_(outer, 1 - beta)

    @staticmethod
    def _refresh(state: dict) -> None:
        """One power iteration + QR per basis; V follows its columns."""
        exp_avg_sq = state["exp_avg_sq"]
        new_bases: list[Tensor | None] = []
        for k, (stat, Q) in enumerate(zip(state["GG"], state["Q"])):
            if stat is None:
                new_bases.append(None)
                continue
            estimated_eigenvalues = (Q * (stat @ Q)).sum(0)  # diag(Q^T L Q)
            order = torch.argsort(estimated_eigenvalues, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(k, order)
            Q_new, _ = torch.linalg.qr(stat @ Q[:, order])
            new_bases.append(Q_new)
        state["exp_avg_sq"] = exp_avg_sq
        state["Q"] = new_bases

    def _init_state(self, state: dict, g: Tensor, group: dict) -> None:
        precondition = g.ndim > 1 or group["precondition_1d"]
        stats = [
            g.new_zeros(size, size) if precondition and size <= group["max_precond_dim"] else None
            for size in g.shape
        ]
        self._accumulate(stats, g, self._shampoo_beta(group))
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(g)
        state["exp_avg_sq"] = torch.zeros_like(g)
        state["GG"] = stats
        state["Q"] = [None if s is None else eigenbasis(s) for s in stats]

    @staticmethod
    def _shampoo_beta(group: dict) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        g = self._to_precond_shape(p.grad.to(state_dtype(p)), group)
        if not state:
            self._init_state(state, g, group)  # first step: statistics and basis only
            return
        beta1, beta2 = group["betas"]
        lr, bases = group["lr"], state["Q"]
        state["step"] += 1
        t = state["step"]

        g_rot = rotate(g, bases)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g_rot, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        step_size = lr
        if group["correct_bias"]:
            step_size *= math.sqrt(1 - beta2**t) / (1 - beta1**t)
        update = rotate(exp_avg / (exp_avg_sq.sqrt() + group["eps"]), bases, back=True)
        if group["normalize_grads"]:
            update = update / (1e-30 + update.square().mean().sqrt())
        p.add_(self._from_precond_shape(update, p, group).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.mul_(1 - lr * group["weight_decay"])

        self._accumulate(state["GG"], g, self._shampoo_beta(group))
        if t % group["precondition_frequency"] == 0:
            exp_avg = rotate(exp_avg, state["Q"], back=True)
            self._refresh(state)
            state["exp_avg"] = rotate(exp_avg, state["Q"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        load_state_keep_dtypes(self, state_dict)
