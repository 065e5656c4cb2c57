"""Optimizers over FSDP2 parameters: DTensors sharded along dim 0 on a 1-D device mesh.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, its gradient (already the mean
over ranks: FSDP reduce-scatters it during backward) and every elementwise optimizer state are
row shards: rank s holds rows ``s*c .. (s+1)*c - 1`` with c = ceil(rows / W) (``torch.chunk``;
the last ranks may hold fewer rows, or none).

- AdamW is elementwise: ``torch.optim.AdamW`` runs on the DTensors as they are (its moments are
  DTensors with the parameter's sharding), the same math as one process.
- Muon is elementwise except for Newton-Schulz, which needs the whole matrix. ``FSDPMuon``
  keeps the momentum as a row-sharded DTensor and updates it locally:

      m <- beta m + (1 - beta) g;   u <- (1 - beta) g + beta m  (nesterov) or m

  Same-shape matrices are stacked into blocks of up to W*k; in a block rank r *owns* matrices
  r*k .. r*k+k-1 (the last block is padded with empty slots). One ``all_to_all`` sends every
  rank's row shards of u to the owners (each shard zero-padded to c rows), so each owner holds
  its matrices whole, runs Newton-Schulz (+ NorMuon) on them exactly once, and a second
  ``all_to_all`` sends the update's row shards back. Decoupled (cautious) weight decay and
  W <- W - lr * update are elementwise, on the local shards.

  NorMuon's per-neuron second moment v (one entry per row, or per column of a wide matrix) is
  small: every rank keeps all of it (a plain tensor, as in the single-process state); the owner
  updates it and one all-reduce per block (non-owners add zeros: exact) gives every rank the
  new values.

The state (``momentum_buffer``, ``second_moment``; AdamW's ``exp_avg``, ``exp_avg_sq``,
``step``) has the single-process names and full shapes, so
``torch.distributed.checkpoint.state_dict`` maps it to the one-process optimizer and back, on
any number of ranks.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

from muongpt.optim.combined import CombinedOptimizer, refuse_delayed_steps
from muongpt.optim.config import OptimizerError
from muongpt.optim.muon import (
    Muon,
    apply_update,
    as_matrix_shape,
    neuron_shape,
    orthogonal_update,
    run_closure,
    state_dtype,
)

BLOCK_BYTES = 64 * 2**20  # target size of one all_to_all (the stacked row shards of a block)


def row_sharded(p: Tensor) -> tuple:
    """(process group, world size, rank) of a parameter FSDP2 sharded along dim 0."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        raise OptimizerError(
            "FSDPMuon takes FSDP2 parameters (DTensors); apply fully_shard to the model first"
        )
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise OptimizerError(
            f"FSDPMuon needs parameters sharded along dim 0 on a 1-D mesh, got {p.placements} "
            f"on a {p.device_mesh.ndim}-D mesh"
        )
    group = p.device_mesh.get_group()
    return group, dist.get_world_size(group), dist.get_rank(group)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (an alias: in-place ops on it update the DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPMuon(Muon):
    """Muon over row-sharded DTensor parameters; the update math of ``Muon`` (see module doc)."""

    state_kind = "Muon"

    def __init__(self, params, *args, block_bytes: int = BLOCK_BYTES, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.block_bytes = block_bytes

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:  # the same on every rank: FSDP reduces every gradient
                    by_shape[(p.shape, p.dtype)].append(p)
            # largest first, so the owners' Newton-Schulz work is spread like the sharded Muon's
            for params in sorted(by_shape.values(), key=lambda ps: -ps[0].numel()):
                W = row_sharded(params[0])[1]
                rows, cols = as_matrix_shape(params[0].shape)
                nbytes = math.ceil(rows / W) * cols * 4
                k = max(1, min(math.ceil(len(params) / W), self.block_bytes // (W * nbytes)))
                for start in range(0, len(params), W * k):
                    self._step_block(group, params[start : start + W * k], k)
        return loss

    def _state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))  # a DTensor
        if group["normuon"] and "second_moment" not in state:
            shape = neuron_shape(*as_matrix_shape(p.shape))
            state["second_moment"] = torch.zeros(
                shape, dtype=state_dtype(p), device=local(p).device
            )
        return state

    def _step_block(self, group: dict, params: list[Tensor], k: int) -> None:
        pg, W, r = row_sharded(params[0])
        rows, cols = as_matrix_shape(params[0].shape)
        c = math.ceil(rows / W)
        beta = group["momentum"]
        states = [self._state(p, group) for p in params]

        # momentum on the local rows; u's row shards stacked as send[owner, slot] (padded to c)
        first = local(states[0]["momentum_buffer"])
        send = torch.zeros(W, k, c, cols, dtype=first.dtype, device=first.device)
        for i, (p, state) in enumerate(zip(params, states)):
            buf = local(state["momentum_buffer"])
            grad = local(p.grad).to(buf.dtype)
            buf.lerp_(grad, 1 - beta)  # m <- beta m + (1 - beta) g
            u = grad.lerp(buf, beta) if group["nesterov"] else buf
            send[i // k, i % k, : u.shape[0]] = u.reshape(u.shape[0], cols)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=pg)  # recv[s, j]: rank s's rows of my slot j

        owned = params[r * k : (r + 1) * k]
        back = torch.zeros_like(send)  # back[s, j]: rows of s's shard of my slot j's update
        second_moment = None
        if owned:
            j = len(owned)
            full = recv[:, :j].transpose(0, 1).reshape(j, W * c, cols)[:, :rows]
            if group["normuon"]:
                second_moment = torch.stack([self.state[p]["second_moment"] for p in owned])
            update = orthogonal_update(
                full.reshape(j, *params[0].shape), group, self.ns_dtype, second_moment
            )
            padded = torch.zeros(j, W * c, cols, dtype=back.dtype, device=back.device)
            padded[:, :rows] = update
            back[:, :j] = padded.view(j, W, c, cols).transpose(0, 1)
        mine = torch.empty_like(back)
        dist.all_to_all_single(mine, back, group=pg)  # mine[owner, slot]: my rows of the update

        if group["normuon"]:  # the owner's new second moments, to every rank
            shape = states[0]["second_moment"].shape
            moments = torch.zeros(W * k, *shape, dtype=first.dtype, device=first.device)
            if second_moment is not None:
                moments[r * k : r * k + len(owned)] = second_moment
            dist.all_reduce(moments, group=pg)
            torch._foreach_copy_([s["second_moment"] for s in states], list(moments[: len(params)]))

        # weight decay and the step, elementwise on the local rows
        for i, p in enumerate(params):
            w = local(p)
            n = w.shape[0]
            if n:
                update = mine[i // k, i % k, :n].view(1, *w.shape)
                apply_update([w], update, group)


def fsdp_optimizer(combined: CombinedOptimizer) -> CombinedOptimizer:
    """The FSDP counterpart of a ``CombinedOptimizer`` built on a ``fully_shard``-ed model (same
    groups and hyperparameters): Muon -> FSDPMuon, AdamW on the DTensors (foreach; torch's fused
    AdamW is not used on DTensors); anything else is refused."""
    refuse_delayed_steps(combined, "FSDP")
    optimizers = []
    for opt in combined.optimizers:
        groups = [dict(g) for g in opt.param_groups]
        if isinstance(opt, Muon):
            optimizers.append(FSDPMuon(groups, **opt.defaults, ns_dtype=opt.ns_dtype))
        elif isinstance(opt, torch.optim.AdamW):
            accepted = inspect.signature(torch.optim.AdamW).parameters  # defaults has more keys
            defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
            defaults.update(fused=None, foreach=True)
            # each group carries the implementation it was built with (fused on CUDA), and
            # AdamW's step reads the group's: drop them so that the defaults above hold
            groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups]
            optimizers.append(torch.optim.AdamW(groups, **defaults))
        else:
            raise OptimizerError(
                f"training.parallel=fsdp supports optimizer=muon and optimizer=adamw, not "
                f"{type(opt).__name__}; use training.parallel=replicate"
            )
    return FSDPCombinedOptimizer(optimizers, header=combined.header, tie=combined.tie)


class FSDPCombinedOptimizer(CombinedOptimizer):
    """``CombinedOptimizer`` over DTensor parameters: the clip norm is the global one. A tied
    pair trains as in one process: both are row-sharded alike, so the fold, the copy and the
    untie's rescaled AdamW state are elementwise on the local rows.

    Parameters FSDP left whole (plain tensors: the 0-dim ones it cannot shard) get their
    gradients averaged over ranks here, in one all-reduce before clipping or the step.
    """

    overlap_side_steps = False  # Muon's step exchanges shards: one stream

    def __init__(self, optimizers, header: str = "", tie=None):
        super().__init__(optimizers, header, tie=tie)
        params = [p for g in self.param_groups for p in g["params"]]
        self.replicated = [p for p in params if not hasattr(p, "to_local")]
        self.reduced = False

    def _reduce_replicated(self) -> None:
        if self.reduced or not self.replicated or not dist.is_initialized():
            return
        self.reduced = True
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # a sum: gloo has no average
        flat /= dist.get_world_size()
        for p, g in zip(self.replicated, flat.split([p.numel() for p in self.replicated])):
            p.grad = g.view_as(p).to(p.dtype)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        self._reduce_replicated()
        norm = super().clip_grad_norm_(max_norm)  # DTensor-aware: reduces over the shards
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def step(self, closure=None):
        self._reduce_replicated()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.reduced = False

    def summary(self) -> str:
        return (
            super().summary() + "\n  fully sharded (FSDP2): parameters, gradients and optimizer "
            "state split by rows; Muon's matrices orthogonalized whole by their owner rank"
        )
