"""Optimizer configs: one schema per choice of the Hydra ``optimizer`` group, each the only place
its defaults live (the optimizers' own keyword defaults read them from here).

- ``muon`` (``MuonConfig``): Muon for the hidden matrices, AdamW for embeddings, lm_head and
  scalars (``embed_lr``, ``head_lr``, ``scalar_lr``, ``adam_betas``, ``adam_eps``).
  modded-nanogpt-like: Muon lr 0.05 with the spectral scale sqrt(max(1, rows/cols)), momentum
  0.95 warmed up from 0.85 over 300 steps, AdamW embed 0.6 / head 0.008 / scalars 0.04.
- ``soap`` (``SOAPConfig``): SOAP for the hidden matrices, the same AdamW groups.
- ``adamw`` (``AdamWConfig``): AdamW everywhere (``betas``, ``eps`` for every group).

Every choice takes ``adamw_overrides``: AdamW's betas, eps or weight decay for one side group
(embed, head or scalar) in place of the shared values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from muongpt import MuonGPTError


class OptimizerError(MuonGPTError, ValueError):
    """Bad optimizer input: names the parameter or argument at fault."""


@dataclass
class SideGroupsConfig:
    """The AdamW groups beside the hidden matrices; every lr times (n_embd / 768) ** -0.5."""

    embed_lr: float = 0.6
    head_lr: float = 0.008  # a plain nn.Linear head (no 1/sqrt(d) output scaling)
    scalar_lr: float = 0.04
    # the embedding tables and lm_head take an AdamW step every this many steps, on the mean of
    # those steps' gradients (accumulated in .grad: the big tables' update costs 1/N as often)
    embed_head_every: int = 1
    # AdamW's large tensors (>= 1M elements) stepped by the Triton kernel of kernels/adamw.py, one
    # launch each, on CUDA (optim/adamw.py); off: torch's fused AdamW. Off: 0.1 ms off a speed-run
    # step (H100, 2026-12-05; its own step 1.81 against 2.31 ms, docs/optimizers.md)
    adamw_kernel: bool = False
    # AdamW options of single side groups over the shared ones (betas, eps; weight decay 0), e.g.
    # {head: {betas: [0.5, 0.95], weight_decay: 0.1}}; keys embed | head | scalar
    adamw_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class HybridConfig(SideGroupsConfig):
    """A matrix optimizer (Muon, SOAP) with AdamW for the side groups."""

    adam_betas: list[float] = field(default_factory=lambda: [0.8, 0.95])
    adam_eps: float = 1e-10


@dataclass
class MuonConfig(HybridConfig):
    name: str = "muon"
    lr: float = 0.05  # of the hidden matrices
    weight_decay: float = 0.0  # decoupled, hidden matrices only
    momentum: float = 0.95
    momentum_start: float = 0.85  # warmed up linearly to `momentum` ...
    momentum_warmup_steps: int = 300  # ... over this many steps
    momentum_cooldown_steps: int = 0  # the last this many steps go back down to momentum_start
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "polar_express"  # classic | polar_express
    scale_mode: str = "spectral"  # spectral: sqrt(max(1, rows/cols)) | match_adamw: 0.2*sqrt(max)
    normuon: bool = False  # NorMuon: a per-neuron second moment normalizes the orthogonal update
    normuon_beta2: float = 0.95
    cautious_wd: bool = False  # decay only where the weight and its update have the same sign


SOAP_BETAS = (0.95, 0.95)


@dataclass
class SOAPConfig(HybridConfig):
    """SOAP (Vyas et al. 2024), the reference's names and defaults but ``one_sided``."""

    name: str = "soap"
    lr: float = 0.003
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: list(SOAP_BETAS))
    eps: float = 1e-8
    shampoo_beta: float = -1.0  # < 0 means betas[1]
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    data_format: str = "channels_first"
    correct_bias: bool = True
    # only the smallest side of each matrix: at d12 0.14 nats better than two-sided, at 0.44 of
    # the state and half the step (docs/optimizers.md, 2026-12-03)
    one_sided: bool = True
    precondition_dtype: str = "auto"  # of the per-step matmuls: auto (bf16 on CUDA) | float32 ...
    orthonormalize: str = "cholesky_qr"  # the basis refresh: cholesky_qr | qr (Householder)


@dataclass
class AdamWConfig(SideGroupsConfig):
    """AdamW everywhere: the hidden matrices at ``lr`` (with ``weight_decay``), the side groups at
    the hybrids' lrs, so that a comparison differs only in the matrix optimizer."""

    name: str = "adamw"
    lr: float = 0.003
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


OPTIMIZER_CONFIGS: dict[str, type] = {"muon": MuonConfig, "soap": SOAPConfig, "adamw": AdamWConfig}
OPTIMIZER_NAMES = tuple(sorted(OPTIMIZER_CONFIGS))
OptimizerConfig = MuonConfig | SOAPConfig | AdamWConfig


def check_lr(value: float, what: str) -> float:
    if not value > 0:
        raise OptimizerError(f"{what} must be > 0, got {value}")
    return float(value)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptimizerError(f"{what} must be a number, got {value!r}")
    return float(value)


def check_unit(value: float, what: str) -> float:
    """A decay rate (beta, momentum) in [0, 1)."""
    if not 0.0 <= _number(value, what) < 1.0:
        raise OptimizerError(f"{what} must be in [0, 1), got {value}")
    return float(value)


def check_betas(betas, what: str) -> tuple[float, float]:
    betas = tuple(betas) if isinstance(betas, list | tuple) else (betas,)
    if len(betas) != 2:
        raise OptimizerError(f"{what} must be two numbers, got {list(betas)}")
    return check_unit(betas[0], f"{what}[0]"), check_unit(betas[1], f"{what}[1]")


def check_nonnegative(value: float, what: str) -> float:
    if not _number(value, what) >= 0:
        raise OptimizerError(f"{what} must be >= 0, got {value}")
    return float(value)


SIDE_GROUPS = ("embed", "head", "scalar")
ADAMW_OPTIONS = ("betas", "eps", "weight_decay")


def adamw_overrides(overrides) -> dict[str, dict[str, Any]]:
    """``optimizer.adamw_overrides`` checked: {side group: {AdamW option: value}}, with betas
    as a tuple, each value in its range; anything else is a one-line error naming it."""
    checked = {}
    for group, options in dict(overrides or {}).items():
        what = f"optimizer.adamw_overrides.{group}"
        if group not in SIDE_GROUPS:
            raise OptimizerError(
                f"{what}: unknown group (the side groups: {', '.join(SIDE_GROUPS)})"
            )
        if not isinstance(options, dict) or not options:
            raise OptimizerError(f"{what} must map AdamW options to values, got {options!r}")
        unknown = sorted(set(options) - set(ADAMW_OPTIONS))
        if unknown:
            raise OptimizerError(
                f"{what}: unknown option(s) {', '.join(unknown)} (known: {', '.join(ADAMW_OPTIONS)})"
            )
        checked[group] = {
            key: check_betas(value, f"{what}.betas") if key == "betas"
            else check_nonnegative(value, f"{what}.{key}")
            for key, value in options.items()
        }  # fmt: skip
    return checked
