"""The hybrid optimizer: the model's parameter groups given to Muon / SOAP / AdamW, stepped as one.

The model declares its groups (``model.optimizer_groups()``: ``matrix``, ``embed``, ``head``,
``scalar``); ``build_optimizer(model, cfg)`` gives ``matrix`` to the matrix optimizer of ``cfg``
(Muon, SOAP, or AdamW for ``name: adamw``) and the other three to AdamW at ``embed_lr``,
``head_lr``, ``scalar_lr``, without weight decay. The side groups' AdamW lrs are multiplied by
(n_embd / 768) ** -0.5; for ``adamw`` the hidden matrices' lr by (n_embd / 768) ** -1 *
(n_layer / 12) ** -0.5 (muP's 1/width for Adam on hidden matrices, and 1/sqrt(depth): fitted
against AdamW lr sweeps at d12, at d12 with 24 layers, at d12 1024 wide and at d24, checked at
d36, see docs/optimizers.md; the side groups' rule keeps the lr where d12 put it under Muon, which
transfers to d24). Each parameter lands in exactly one group
(checked). AdamW is ``fused`` when every parameter is on CUDA, and there it steps on a second CUDA
stream beside the matrix optimizer (disjoint parameters: the same result). Each group remembers its
``base_lr``; ``apply_schedule(lr_scale, momentum)`` sets lr = base_lr * lr_scale for every group
and, where given, Muon's momentum (the trainer's schedule computes both). A model that ties two
weights (``model.tied_weights()``: copy, master) has them trained as one while ``tied``: the
copy's gradient is added to the master's, the master's optimizer steps, the copy takes its values.
At the untie (``untie``) the copy's AdamW starts from the master's moments, not from zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from muongpt.optim.adamw import KernelAdamW
from muongpt.optim.config import (
    OPTIMIZER_CONFIGS,
    OPTIMIZER_NAMES,
    SIDE_GROUPS,
    MuonConfig,
    OptimizerConfig,
    OptimizerError,
    adamw_overrides,
    check_betas,
    check_lr,
    check_nonnegative,
    check_unit,
)
from muongpt.optim.muon import Muon, run_closure
from muongpt.optim.soap import SOAP

REFERENCE_WIDTH = 768
REFERENCE_DEPTH = 12


def adamw_matrix_scale(n_embd: int, n_layer: int) -> float:
    """The factor on AdamW's hidden-matrix lr: 1 at d12, 1/width and 1/sqrt(depth) around it."""
    return (n_embd / REFERENCE_WIDTH) ** -1 * (n_layer / REFERENCE_DEPTH) ** -0.5


GROUP_NAMES = ("matrix", *SIDE_GROUPS)
DELAYED_GROUPS = ("embed", "head")  # the groups ``embed_head_every`` steps less often


def optimizer_kind(opt: torch.optim.Optimizer) -> str:
    """The name a checkpoint records; a sharded optimizer saves its single-process kind's state."""
    return getattr(opt, "state_kind", type(opt).__name__)


def adamw_state_of_scaled_rows(source: dict, row_scale: torch.Tensor | None) -> dict:
    """AdamW's state ``source`` for a copy of its parameter whose rows were scaled by
    ``row_scale`` (rows, 1) under a normalised lookup, which scales their gradients by 1 / s:
    the same step count, exp_avg / s, exp_avg_sq / s^2."""
    m, v = source["exp_avg"], source["exp_avg_sq"]
    s = torch.ones((), device=m.device) if row_scale is None else row_scale.to(m.device)
    return {
        "step": source["step"].clone(),
        "exp_avg": (m / s).to(m.dtype),
        "exp_avg_sq": (v / s.square()).to(v.dtype),
    }


class CombinedOptimizer:
    """Several torch optimizers stepped as one; ``optimizers`` lists them.

    ``every`` maps an optimizer's index to N > 1: that one steps only on every N-th step, on the
    mean of the N steps' gradients, which stay in ``.grad`` between (``zero_grad`` keeps them;
    ``state_dict`` carries them, so a resume between two of its steps is exact). A step that is
    skipped (``zero_grad`` without ``step``, e.g. a non-finite loss) drops them too."""

    # on CUDA the optimizers after the first step on a second stream, beside the first (off
    # where a subclass's step communicates: the sharded forms order their own collectives)
    overlap_side_steps = True

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        header: str = "",
        every: dict[int, int] | None = None,
        tie: tuple[nn.Parameter, nn.Parameter] | None = None,
    ):
        if not optimizers:
            raise OptimizerError("CombinedOptimizer got no optimizers")
        self.optimizers = list(optimizers)
        self.header = header
        self.every = dict(every or {})
        self.steps = 0  # optimizer steps taken (the count ``every`` is read against)
        self._stepped = False  # step() since the last zero_grad()
        # the model's tied pair (copy, master): while ``tied``, the master is stepped on both
        # gradients and the copy takes its values (the trainer's schedule sets ``tied``)
        self.tie = tie
        self.tied = tie is not None
        self.side_stream = self._side_stream()

    def _fold_tied_grads(self) -> None:
        """While tied, the copy's gradient joins the master's: one weight's gradient."""
        if not (self.tie and self.tied) or self.tie[0].grad is None:
            return
        copy, master = self.tie
        master.grad = copy.grad if master.grad is None else master.grad.add_(copy.grad)
        copy.grad = None

    @torch.no_grad()
    def untie(self, row_scale: torch.Tensor | None = None) -> None:
        """Train the pair apart from now on. The copy's AdamW state starts as the master's
        (its step count and moments), so that its first steps are as large as the master's
        were, not Adam's first, unit-size steps. The model scaled the copy's rows by
        ``row_scale`` (rows, 1) at the untie, which scales their gradients by 1 / row_scale:
        exp_avg / s, exp_avg_sq / s^2."""
        if self.tie is None:
            raise OptimizerError("untie: this optimizer trains no tied pair")
        self.tied = False
        copy, master = self.tie
        source = next((o.state[master] for o in self.optimizers if master in o.state), None)
        target = next(
            o
            for o in self.optimizers
            for g in o.param_groups
            if any(p is copy for p in g["params"])
        )
        if not source or not {"step", "exp_avg", "exp_avg_sq"} <= set(source):
            return  # the master has not stepped yet, or not with AdamW: a fresh start
        target.state[copy] = adamw_state_of_scaled_rows(source, row_scale)

    def _holding(self) -> set[int]:
        """The optimizers whose gradients keep accumulating after this step."""
        return {i for i, n in self.every.items() if self.steps % n}

    def _delayed_params(self) -> list[nn.Parameter]:
        return [
            p
            for i in sorted(self.every)
            for g in self.optimizers[i].param_groups
            for p in g["params"]
        ]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _side_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream the side optimizers step on, or None: the optimizers step one after
        another (CPU, DTensors, a single optimizer)."""
        params = [p for g in self.param_groups for p in g["params"]]
        plain_cuda = all(p.is_cuda and type(p) is nn.Parameter for p in params)
        if self.overlap_side_steps and plain_cuda and len(self.optimizers) > 1:
            return torch.cuda.Stream(params[0].device)
        return None

    def _step_one(self, i: int, opt: torch.optim.Optimizer) -> None:
        n = self.every.get(i, 1)
        if n > 1:  # the mean of the accumulated gradients
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, float(n))
        opt.step()

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        self._fold_tied_grads()
        self.steps += 1
        self._stepped = True
        holding = self._holding()
        due = [(i, opt) for i, opt in enumerate(self.optimizers) if i not in holding]
        side = self.side_stream
        if side is None or len(due) < 2:
            for i, opt in due:
                self._step_one(i, opt)
        else:
            # the side optimizers (AdamW over the tables, memory-bound) run beside the matrix
            # optimizer (many small matmuls): disjoint parameters, so the same arithmetic
            main = torch.cuda.current_stream(side.device)
            side.wait_stream(main)  # the gradients are complete
            with torch.cuda.stream(side):
                for i, opt in due[1:]:
                    self._step_one(i, opt)
            self._step_one(*due[0])
            main.wait_stream(side)  # later work, and frees of the gradients, come after both
        if self.tie and self.tied:
            self.tie[0].copy_(self.tie[1])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        holding = self._holding() if self._stepped else set()  # a skipped step drops them all
        for i, opt in enumerate(self.optimizers):
            if i not in holding:
                opt.zero_grad(set_to_none=set_to_none)
        self._stepped = False

    def reduce_during_next_backward(self) -> None:
        """Called before the last micro-step's backward; only sharded optimizers use it."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to global norm ``max_norm`` (over ranks when distributed)."""
        self._fold_tied_grads()
        params = [p for g in self.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def apply_schedule(self, lr_scale: float, momentum: float | None = None) -> None:
        """lr = base_lr * lr_scale in every group; Muon's momentum, when given."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                if momentum is not None and isinstance(opt, Muon):
                    group["momentum"] = momentum

    def state_dict(self) -> dict[str, Any]:
        state = {
            "kinds": [optimizer_kind(opt) for opt in self.optimizers],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }
        if self.every:  # the step count and the gradients accumulated so far
            state["steps"] = self.steps
            state["pending_grads"] = [
                None if p.grad is None else p.grad.detach().clone() for p in self._delayed_params()
            ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the optimizer state (moments, bases); hyperparameters stay as configured now."""
        kinds = [optimizer_kind(opt) for opt in self.optimizers]
        if state_dict.get("kinds") != kinds:
            raise OptimizerError(
                f"optimizer state is for {state_dict.get('kinds')}, this run builds {kinds}"
            )
        for opt, saved in zip(self.optimizers, state_dict["optimizers"]):
            sizes = [len(g["params"]) for g in opt.param_groups]
            saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
            if sizes != saved_sizes:
                raise OptimizerError(
                    f"{type(opt).__name__} state has groups of {saved_sizes} tensors, "
                    f"this run has {sizes}"
                )
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(saved)
            for group, configured in zip(opt.param_groups, hyper):
                group.update(configured)
        if self.every:
            self.steps = int(state_dict.get("steps", 0))
            pending = state_dict.get("pending_grads") or []
            for p, grad in zip(self._delayed_params(), pending):
                p.grad = None if grad is None else grad.to(p.device, p.dtype).clone()

    def summary(self) -> str:
        lines = [self.header] if self.header else []
        total_tensors = total_params = 0
        for opt in self.optimizers:
            for group in opt.param_groups:
                n_tensors = len(group["params"])
                n_params = sum(p.numel() for p in group["params"])
                total_tensors += n_tensors
                total_params += n_params
                lines.append(
                    f"  {type(opt).__name__:<6} {group.get('name', '?'):<7} {n_tensors:>5} tensors "
                    f"{n_params:>13,} params  lr {group['base_lr']:.4g}{_options(opt, group)}"
                )
        lines.append(f"  {'total':<14} {total_tensors:>5} tensors {total_params:>13,} params")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def _options(opt: torch.optim.Optimizer, group: dict) -> str:
    """A group's betas and eps where they differ from its optimizer's shared ones; its decay."""
    shown = []
    if "betas" in group and tuple(group["betas"]) != tuple(opt.defaults.get("betas", ())):
        shown.append(f"betas {tuple(group['betas'])}")
    if "eps" in group and group["eps"] != opt.defaults.get("eps"):
        shown.append(f"eps {group['eps']:g}")
    if group.get("weight_decay"):
        shown.append(f"wd {group['weight_decay']:g}")
    return "".join(f"  {text}" for text in shown)


def as_optimizer_config(cfg: Any) -> OptimizerConfig:
    """The optimizer config of ``cfg``: itself, or the schema its ``name`` picks, filled from a
    DictConfig (structured or not) or a plain mapping."""
    if isinstance(cfg, tuple(OPTIMIZER_CONFIGS.values())):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise OptimizerError(f"optimizer config must be a mapping, got {type(cfg).__name__}")
    name = cfg.get("name", "muon")
    if name not in OPTIMIZER_CONFIGS:
        raise OptimizerError(f"optimizer.name must be one of {OPTIMIZER_NAMES}, got {name!r}")
    schema = OPTIMIZER_CONFIGS[name]
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise OptimizerError(f"unknown optimizer.{name} config key(s): {', '.join(unknown)}")
    return schema(**cfg)


def model_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The model's own declaration of its parameter groups (``optimizer_groups``)."""
    declare = getattr(model, "optimizer_groups", None)
    if declare is None:
        raise OptimizerError(
            f"{type(model).__name__} does not declare optimizer_groups() "
            f"(a dict of {GROUP_NAMES} to (name, parameter) pairs)"
        )
    groups = declare()
    if set(groups) - set(GROUP_NAMES):
        raise OptimizerError(f"unknown optimizer groups {sorted(set(groups) - set(GROUP_NAMES))}")
    return {name: list(groups.get(name, [])) for name in GROUP_NAMES}


def validate_config(cfg: OptimizerConfig) -> None:
    check_lr(cfg.lr, "optimizer.lr")
    check_nonnegative(cfg.weight_decay, "optimizer.weight_decay")
    if cfg.name in ("adamw", "soap"):
        check_betas(cfg.betas, "optimizer.betas")
        check_nonnegative(cfg.eps, "optimizer.eps")
    for key in ("embed_lr", "head_lr", "scalar_lr"):
        check_lr(getattr(cfg, key), f"optimizer.{key}")
    if not isinstance(cfg.embed_head_every, int) or cfg.embed_head_every < 1:
        raise OptimizerError(
            f"optimizer.embed_head_every must be an integer >= 1, got {cfg.embed_head_every!r}"
        )
    if cfg.name in ("muon", "soap"):
        check_betas(cfg.adam_betas, "optimizer.adam_betas")
        check_nonnegative(cfg.adam_eps, "optimizer.adam_eps")
    if isinstance(cfg, MuonConfig):
        check_unit(cfg.momentum, "optimizer.momentum")
        check_unit(cfg.momentum_start, "optimizer.momentum_start")
        check_unit(cfg.normuon_beta2, "optimizer.normuon_beta2")
        for key in ("momentum_warmup_steps", "momentum_cooldown_steps"):
            if getattr(cfg, key) < 0:
                raise OptimizerError(f"optimizer.{key} must be >= 0, got {getattr(cfg, key)}")


def _group(name: str, pairs: list, lr: float, **options) -> dict[str, Any]:
    return {
        "params": [p for _, p in pairs],
        "param_names": [n for n, _ in pairs],
        "name": name,
        "lr": lr,
        "base_lr": lr,
        **options,
    }


def _adamw(groups: list[dict], betas, eps: float, kernel: bool = False) -> torch.optim.AdamW:
    """torch's AdamW, fused where every parameter is on CUDA; with ``kernel`` there, the AdamW
    whose large tensors step in a Triton kernel (optim/adamw.py)."""
    params = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in params)
    options = dict(lr=groups[0]["lr"], betas=tuple(betas), eps=eps, weight_decay=0.0)
    if kernel and on_cuda:
        return KernelAdamW(groups, **options)
    return torch.optim.AdamW(groups, **options, fused=True if on_cuda else None)


def build_optimizer(model: nn.Module, cfg: Any) -> CombinedOptimizer:
    """The optimizer a config describes, over the groups ``model`` declares (one process; the
    trainer wraps it with ``optim.distributed.distribute`` under torchrun)."""
    cfg = as_optimizer_config(cfg)
    validate_config(cfg)
    n_embd = model.config.n_embd
    adam_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    routed = model_groups(model)
    if not any(routed.values()):
        raise OptimizerError("model has no trainable parameters (empty parameter list)")

    optimizers: list[torch.optim.Optimizer] = []
    side_lrs = {"embed": cfg.embed_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr}
    # per side group, over the shared options (checked here: one-line errors)
    overrides = adamw_overrides(cfg.adamw_overrides)

    def adamw_options(name: str) -> dict:  # decay on the matrices only, unless a group asks
        decay = cfg.weight_decay if name == "matrix" else 0.0
        return {"weight_decay": decay, **overrides.get(name, {})}

    matrix_scale = adamw_matrix_scale(n_embd, model.config.n_layer)
    if cfg.name == "adamw":
        # The same side groups as the hybrids, so a comparison differs only in the matrix optimizer.
        lrs = {
            "matrix": cfg.lr * matrix_scale,
            **{name: lr * adam_scale for name, lr in side_lrs.items()},
        }
        groups = [
            _group(name, routed[name], lrs[name], **adamw_options(name))
            for name in GROUP_NAMES
            if routed[name]
        ]
        optimizers += _adamws(groups, cfg.betas, cfg.eps, cfg)
    else:
        matrices = routed["matrix"]
        if matrices and cfg.name == "muon":
            group = _group("matrix", matrices, cfg.lr)
            optimizers.append(
                Muon(
                    [group],
                    lr=cfg.lr,
                    momentum=cfg.momentum,
                    nesterov=cfg.nesterov,
                    weight_decay=cfg.weight_decay,
                    ns_steps=cfg.ns_steps,
                    ns_coefficients=cfg.ns_coefficients,
                    scale_mode=cfg.scale_mode,
                    normuon=cfg.normuon,
                    normuon_beta2=cfg.normuon_beta2,
                    cautious_wd=cfg.cautious_wd,
                )
            )
        elif matrices:
            group = _group("matrix", matrices, cfg.lr)
            optimizers.append(
                SOAP(
                    [group],
                    lr=cfg.lr,
                    betas=tuple(cfg.betas),
                    shampoo_beta=cfg.shampoo_beta,
                    eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                    precondition_frequency=cfg.precondition_frequency,
                    max_precond_dim=cfg.max_precond_dim,
                    merge_dims=cfg.merge_dims,
                    precondition_1d=cfg.precondition_1d,
                    normalize_grads=cfg.normalize_grads,
                    data_format=cfg.data_format,
                    correct_bias=cfg.correct_bias,
                    one_sided=cfg.one_sided,
                    precondition_dtype=cfg.precondition_dtype,
                    orthonormalize=cfg.orthonormalize,
                )
            )
        groups = [
            _group(name, routed[name], lr * adam_scale, **adamw_options(name))
            for name, lr in side_lrs.items()
            if routed[name]
        ]
        optimizers += _adamws(groups, cfg.adam_betas, cfg.adam_eps, cfg)

    _check_partition(model, optimizers)
    every = {  # the AdamW of the embed and head groups, where they step less often
        i: cfg.embed_head_every
        for i, opt in enumerate(optimizers)
        if cfg.embed_head_every > 1 and opt.param_groups[0]["name"] in DELAYED_GROUPS
    }
    header = (
        f"optimizer {cfg.name}: the model's groups (n_embd {n_embd}, AdamW lrs x {adam_scale:.3f}"
    )
    if cfg.name == "adamw":
        header += f", the hidden matrices' x {matrix_scale:.3f}"
    header += ")"
    if every:
        header += f"; embed and head step every {cfg.embed_head_every} steps"
    tie = model.tied_weights() if hasattr(model, "tied_weights") else None
    if tie is not None and every:
        raise OptimizerError(
            "optimizer.embed_head_every > 1 with a tied embedding and head "
            "(model.tie_embed_head) is not supported: set one of them off"
        )
    if tie is not None:
        header += "; the token embedding trained as the head while tied"
    return CombinedOptimizer(optimizers, header=header, every=every, tie=tie)


def refuse_delayed_steps(combined: CombinedOptimizer, form: str) -> None:
    """The sharded forms reduce and apply every step's gradients: no delayed groups."""
    if combined.every:
        raise OptimizerError(
            f"optimizer.embed_head_every > 1 works in one process only; the {form} optimizer "
            "reduces and applies every step's gradients (set optimizer.embed_head_every=1)"
        )


def _adamws(groups: list[dict], betas, eps: float, cfg: Any) -> list:
    """AdamW over ``groups`` (none if empty); with ``embed_head_every`` > 1 the embed and head
    groups get an AdamW of their own, last, so that it can step less often."""
    delayed = DELAYED_GROUPS if cfg.embed_head_every > 1 else ()
    kept = [g for g in groups if g["name"] not in delayed]
    tables = [g for g in groups if g["name"] in delayed]
    return [_adamw(part, betas, eps, cfg.adamw_kernel) for part in (kept, tables) if part]


def _check_partition(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Every trainable parameter is in exactly one group of one optimizer."""
    placed = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    if len(placed) != len(set(placed)) or set(placed) != set(trainable):
        raise AssertionError("optimizer routing does not place every parameter exactly once")
