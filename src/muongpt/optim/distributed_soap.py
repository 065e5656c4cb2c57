"""DistributedSOAP: SOAP sharded by whole matrices, as DistributedMuon shards Muon.

Same-shape matrices are stacked into blocks of W*k (W ranks, the last block zero-padded), the
``MatrixBlock`` of ``optim.distributed``: one reduce-scatter (mean) per block leaves rank r the
mean gradients of matrices r*k .. r*k+k-1, whole; consecutive blocks of a shape cycle over the
ranks. The owner alone keeps those matrices' SOAP state (moments, statistics, eigenbases) and runs
their step and basis refreshes: an inner single-process ``SOAP`` over the rows of the block's
update buffer, so the math is the single-process code (same-shape matrices batched). One
all-gather per block then brings every rank the new matrices. Each rank holds about 1/W of the
state and does about 1/W of the preconditioner work.

Checkpoints: ``state_dict()`` is a collective that gathers the owners' states into exactly
``SOAP.state_dict()``'s format (on every rank, CPU); ``load_state_dict()`` takes that format and
keeps this rank's matrices. A checkpoint saved on N ranks resumes on any M, 1 included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from muongpt.optim.config import OptimizerError
from muongpt.optim.distributed import (
    BUCKET_BYTES,
    SHARDED_FORMS,
    BucketedStep,
    Comm,
    MatrixBlock,
    _gathered,
    _packed_state_dict,
    _saved_states,
    owner_blocks,
    tensor_bytes,
)
from muongpt.optim.muon import restore_state, state_dtype
from muongpt.optim.soap import SOAP

NOT_HYPER = ("params", "param_names")


def hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in NOT_HYPER}


class SOAPBlock(MatrixBlock):
    """A block of same-shape matrices whose owned ones an inner SOAP steps."""

    def __init__(self, params: list[Tensor], group: dict, k: int, comm: Comm):
        super().__init__(params, group, k, comm)
        # The owned matrices as rows of update_shard: the inner SOAP updates them in place.
        self.rows = list(self.update_shard[: len(self.owned)].unbind(0))
        self.inner = SOAP([{**hyper(group), "params": self.rows}]) if self.rows else None

    def update(self) -> None:
        j = len(self.owned)
        if j:
            torch.stack(self.owned, out=self.update_shard[:j])  # the weights may have been reloaded
            for row, grad in zip(self.rows, self.grad_shard[:j].unbind(0)):
                row.grad = grad
            self.inner.param_groups[0].update(hyper(self.group))  # the schedule's lr
            self.inner.step()
        self.gather = self.comm.all_gather(self.flat, self.update_shard)

    def state_layout(self) -> dict[str, tuple] | None:
        """Each state tensor's shape (without the block dim), or None before the first step.
        Derived from the shape and options alone, so every rank (owner or not) knows it."""
        if not self.initialized:
            return None
        p0, g = self.params[0], self.group
        shape = tuple(SOAP._to_precond_shape(torch.empty(p0.shape, device="meta"), g).shape)
        dims = SOAP._preconditioned_dims(shape, g)
        layout = {"step": (), "exp_avg": shape, "exp_avg_sq": shape}
        for d, (size, used) in enumerate(zip(shape, dims)):
            if used:
                layout[f"GG.{d}"] = layout[f"Q.{d}"] = (size, size)
        return layout

    initialized = False  # SOAP state exists (after the first step); equal on every rank


class DistributedSOAP(BucketedStep, SOAP):
    """SOAP with whole matrices owned by one rank each; see the module doc. Same hyperparameters,
    same math and the same checkpoint format as ``SOAP``."""

    state_kind = "SOAP"

    def __init__(self, params: Iterable, comm: Comm, bucket_bytes: int = BUCKET_BYTES, **kwargs):
        super().__init__(params, **kwargs)
        self.comm = comm
        self.blocks: list[SOAPBlock] = []
        for group, chunk, k in owner_blocks(self.param_groups, comm.world_size, bucket_bytes):
            self.blocks.append(SOAPBlock(chunk, group, k, comm))

    @property
    def buckets(self) -> list[SOAPBlock]:
        return list(self.blocks)

    def update_bucket(self, block: SOAPBlock) -> None:
        """Wait for the block's gradients, step the owned matrices, start the all-gather."""
        block.wait()
        block.update()
        block.initialized = True

    def finish(self) -> None:
        for block in self.blocks:
            block.finish()
            block.reset()

    def local_state(self) -> list[dict]:
        return [dict(b.inner.state) for b in self.blocks if b.inner is not None]

    def describe(self) -> str:
        held = tensor_bytes(self.local_state()) / 2**20
        return (
            f"{len(self.blocks)} blocks of whole matrices reduce-scattered; SOAP state on the "
            f"owner ({held:.1f} MiB on this rank)"
        )

    def state_dict(self) -> dict:
        """Collective: every rank gets the ``SOAP.state_dict()`` of all matrices (CPU)."""
        packed = _packed_state_dict(self)
        index = {id(p): i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        for block in self.blocks:
            layout = block.state_layout()
            if layout is None:
                continue
            dtype, device = state_dtype(block.params[0]), block.params[0].device
            owned = [block.inner.state[row] for row in block.rows] if block.inner else []
            full: dict[str, Tensor] = {}
            for key, shape in layout.items():
                local = torch.zeros((block.k, *shape), dtype=dtype, device=device)
                for j, state in enumerate(owned):
                    name, _, d = key.partition(".")
                    value = state[name] if not d else state[name][int(d)]
                    local[j] = value if torch.is_tensor(value) else float(value)
                full[key] = _gathered(self.comm, local)
            n_dims = len(layout["exp_avg"])
            for i, p in enumerate(block.params):
                packed["state"][index[id(p)]] = {
                    "step": int(full["step"][i].item()),
                    "exp_avg": full["exp_avg"][i].cpu(),
                    "exp_avg_sq": full["exp_avg_sq"][i].cpu(),
                    "GG": [
                        full[f"GG.{d}"][i].cpu() if f"GG.{d}" in full else None
                        for d in range(n_dims)
                    ],
                    "Q": [
                        full[f"Q.{d}"][i].cpu() if f"Q.{d}" in full else None for d in range(n_dims)
                    ],
                }
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep this rank's matrices of a ``SOAP`` state (saved with any number of ranks)."""
        saved = _saved_states(self, state_dict)  # updates the live groups' hyperparameters
        for block in self.blocks:
            present = [id(p) in saved for p in block.params]
            if any(present) and not all(present):
                raise OptimizerError("SOAP state holds some matrices of a shape but not all")
            block.initialized = all(present)
            if block.inner is None:
                continue
            block.inner.state.clear()
            block.inner.stacks = {}
            if block.initialized:
                for row, p in zip(block.rows, block.owned):
                    block.inner.state[row] = restore_state(saved[id(p)], row.device)


SHARDED_FORMS[SOAP] = lambda opt, groups, comm, bucket_bytes: DistributedSOAP(
    groups, comm, bucket_bytes, **opt.defaults
)
