"""Sharded optimizers for torchrun: DistributedMuon, ZeRO2AdamW, and the gradient reduction they own.

There is no DDP wrapper: nothing else averages gradients across ranks. Each rank's ``p.grad`` is
the mean over its own micro-batches, and every parameter belongs to exactly one *bucket* whose
collective turns it into the mean over all ranks, once per step:

- ``DistributedMuon`` (hidden matrices): same-shape matrices are stacked into blocks of W*k
  (W ranks, the last block zero-padded); one reduce-scatter (mean) per block leaves rank r the
  mean gradients of matrices r*k .. r*k+k-1 of that block, whole. Consecutive blocks of a shape
  cycle over the ranks again, so ownership is block-cyclic. The owner alone keeps their momentum, runs Newton-Schulz
  and applies the update; one all-gather per block brings every rank the new matrices (into the
  block's preallocated flat buffer, which also served as the reduce-scatter input).
- ``ZeRO2AdamW`` (embeddings, head, scalars; every group for ``optimizer=adamw``): a tensor of
  ``min_shard_numel`` elements or more is split along dim 0 (rows padded up to a multiple of W);
  a reduce-scatter gives each rank the mean gradient of its rows, an inner ``torch.optim.AdamW``
  (fused on CUDA, as single-process) holds the moments of those rows only and updates them, and
  an all-gather rebuilds the parameter. Smaller tensors are all-reduced in flat buckets and
  updated identically on every rank.
- ``DistributedSOAP`` (``optim.distributed_soap``): SOAP sharded like DistributedMuon, by
  blocks of whole matrices, the owner holding their SOAP state and running their preconditioner.
- Any other optimizer is *replicated*: its gradients are all-reduced (mean) in flat
  buckets and every rank runs it on the same gradients, holding the full state.

Overlap: ``reduce_during_next_backward()`` arms post-accumulate-grad hooks for the last
micro-step's backward; a bucket's collective is launched asynchronously as soon as its last
gradient is final, while backward keeps computing. Buckets launch in one fixed order on every
rank (the order backward is expected to finish them; a bucket that is ready early waits for its
predecessors), as NCCL needs. ``step()`` takes the buckets of all optimizers in that order and
starts each all-gather right after its bucket's update, so it overlaps the next bucket's
compute; the all-gathers are waited for at the end of ``step()``.
A gradient that is ``None`` counts as zeros (all ranks must join every collective), where a
single-process optimizer would skip the parameter.

A tied pair (``model.tied_weights()``: copy, master; both row-sharded by ZeRO2AdamW, with the
same rows on each rank): while tied, each rank adds the copy's reduced rows to the master's,
steps the master's rows only, and after the all-gathers copies the master into the copy, which
is the single-process rule (one weight, stepped on the sum of both gradients) on sharded rows.

Clipping: ``clip_grad_norm_`` waits for every reduction, sums the squared norms of the shards
each rank owns (replicated tensors counted once) with one all-reduce, and scales the shards.

Checkpoints: ``state_dict()`` is a collective (every rank must call it) that gathers the shards
into exactly the single-process format (``Muon`` / ``AdamW`` state, fp32 tensors on the CPU, on
every rank); ``load_state_dict()`` takes that format and keeps this rank's part. So a checkpoint
written with N ranks resumes on any M (1 included) and vice versa.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from muongpt.optim.combined import (
    CombinedOptimizer,
    adamw_state_of_scaled_rows,
    refuse_delayed_steps,
)
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

# torch 2.13 renamed the flat collectives (the old names warn); 2.11 has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Sharded forms of other single-process optimizers, by type: (optimizer, its groups, comm,
# bucket_bytes) -> a BucketedStep optimizer. optim/distributed_soap.py registers SOAP's.
SHARDED_FORMS: dict[type, Callable[..., Any]] = {}

BUCKET_BYTES = 32 * 2**20  # target size of one collective (a Muon block, a flat all-reduce)
MIN_SHARD_NUMEL = 1 << 14  # ZeRO2AdamW: smaller tensors are all-reduced, not sharded


def owner_blocks(param_groups: list[dict], W: int, bucket_bytes: int):
    """(group, matrices, k) for each block of whole matrices that W ranks own k apiece.

    Same-shape matrices of a group, in the order backward finishes them (last layers first), are
    cut into blocks of at most W*k_max (``bucket_bytes`` per rank); rank r owns matrices
    r*k .. r*k+k-1 of a block, and consecutive blocks of a shape cycle over the ranks again.
    """
    for group in param_groups:
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in reversed(group["params"]):
            by_shape.setdefault((p.shape, p.dtype, p.device), []).append(p)
        for params in by_shape.values():
            nbytes = params[0].numel() * params[0].element_size()
            k_max = max(1, bucket_bytes // (W * nbytes))
            for start in range(0, len(params), W * k_max):
                chunk = params[start : start + W * k_max]
                yield group, chunk, math.ceil(len(chunk) / W)


# ---------------------------------------------------------------- collectives
class Pending:
    """An async collective; ``wait()`` finishes it (and divides by W where the backend sums)."""

    def __init__(self, work, after: Callable[[], None] | None = None):
        self.work, self.after = work, after

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.after is not None:
                self.after()


class Comm:
    """The three collectives the optimizers use, async, over one process group.

    NCCL averages natively (ReduceOp.AVG); other backends (gloo) sum, then divide by W.
    ``local_only`` replaces each collective by its local part: for benchmarks that time the same
    step without communication (the results are then wrong), never for training.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.native_avg = dist.get_backend(group) == "nccl"
        self.local_only = False

    def _op(self):
        return dist.ReduceOp.AVG if self.native_avg else dist.ReduceOp.SUM

    def _divide(self, t: Tensor) -> Callable[[], None] | None:
        return None if self.native_avg else (lambda: t.div_(self.world_size))

    def reduce_scatter_mean(self, out: Tensor, inp: Tensor) -> Pending:
        """out (n) <- mean over ranks of inp (W*n), chunk ``rank``."""
        if self.local_only:
            out.view(-1).copy_(inp.view(self.world_size, -1)[self.rank])
            return Pending(None)
        work = _reduce_scatter(out, inp, op=self._op(), group=self.group, async_op=True)
        return Pending(work, self._divide(out))

    def all_reduce_mean(self, buf: Tensor) -> Pending:
        if self.local_only:
            return Pending(None)
        work = dist.all_reduce(buf, op=self._op(), group=self.group, async_op=True)
        return Pending(work, self._divide(buf))

    def all_gather(self, out: Tensor, inp: Tensor) -> Pending:
        """out (W*n) <- every rank's inp (n), in rank order."""
        if self.local_only:
            out.view(self.world_size, -1)[self.rank].copy_(inp.view(-1))
            return Pending(None)
        return Pending(_all_gather(out, inp, group=self.group, async_op=True))


# ---------------------------------------------------------------- gradient buckets
class Bucket:
    """Parameters whose gradients one collective reduces; launched at most once per step."""

    params: list[Tensor]

    def __init__(self, comm: Comm, free_grads: bool):
        self.comm, self.free_grads = comm, free_grads
        self.pending: Pending | None = None
        self.launched = False
        self.remaining = 0  # gradients still to come in an armed backward

    def launch(self) -> None:
        if not self.launched:
            self.launched = True
            self._launch()

    def wait(self) -> None:
        self.launch()
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self._done()

    def reset(self) -> None:
        """After the step (or a skipped one): finish anything in flight, forget it."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        self.launched = False

    def _grads(self) -> list[Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _release_grads(self) -> None:
        if self.free_grads:  # the reduced copy is all the optimizer needs (ZeRO-2)
            for p in self.params:
                p.grad = None

    def _launch(self) -> None:
        raise NotImplementedError

    def _done(self) -> None:
        pass

    def local_sq_norm(self) -> Tensor:
        """Squared norm of the reduced gradient elements this rank holds and no other rank counts."""
        raise NotImplementedError

    def scale_(self, factor: Tensor) -> None:
        raise NotImplementedError


class MatrixBlock(Bucket):
    """Up to W*k same-shape matrices: reduce-scattered so that rank r owns matrices r*k..r*k+k-1."""

    def __init__(self, params: list[Tensor], group: dict, k: int, comm: Comm):
        super().__init__(comm, free_grads=True)
        self.params, self.group, self.k = params, group, k
        W, r, p0 = comm.world_size, comm.rank, params[0]
        self.shape = p0.shape
        # One flat buffer: the stacked local gradients (reduce-scatter input), then the gathered
        # updated matrices (all-gather output). Slots past len(params) are padding, kept zero.
        self.flat = torch.zeros(W * k, *self.shape, dtype=p0.dtype, device=p0.device)
        self.grad_shard = torch.zeros(k, *self.shape, dtype=p0.dtype, device=p0.device)
        self.update_shard = torch.zeros(k, *self.shape, dtype=p0.dtype, device=p0.device)
        self.owned = params[r * k : (r + 1) * k]  # may be fewer than k, or none
        self.momentum: Tensor | None = None  # (len(owned), *shape), created at the first step
        self.second_moment: Tensor | None = None  # NorMuon: (len(owned), *neuron_shape)
        self.gather: Pending | None = None

    def _launch(self) -> None:
        n = len(self.params)
        torch.stack(self._grads(), out=self.flat[:n])
        self.flat[n:].zero_()
        self._release_grads()
        self.pending = self.comm.reduce_scatter_mean(self.grad_shard, self.flat)

    def local_sq_norm(self) -> Tensor:
        return self.grad_shard.float().square().sum()

    def scale_(self, factor: Tensor) -> None:
        self.grad_shard.mul_(factor.to(self.grad_shard.dtype))

    def momentum_buffer(self) -> Tensor:
        if self.momentum is None:
            p0 = self.params[0]
            self.momentum = torch.zeros(
                len(self.owned), *self.shape, dtype=state_dtype(p0), device=p0.device
            )
        return self.momentum

    def second_moment_buffer(self) -> Tensor:
        if self.second_moment is None:
            self.second_moment = torch.zeros(
                len(self.owned),
                *neuron_shape(*as_matrix_shape(self.shape)),
                dtype=state_dtype(self.params[0]),
                device=self.params[0].device,
            )
        return self.second_moment

    def update(self, ns_dtype: torch.dtype) -> None:
        """The owner's Muon step on its matrices (the single-process math), then the all-gather."""
        g = self.group
        j = len(self.owned)
        if j:
            beta = g["momentum"]
            buf = self.momentum_buffer()
            grad = self.grad_shard[:j].to(buf.dtype)
            buf.lerp_(grad, 1 - beta)  # m <- beta m + (1 - beta) g
            u = grad.lerp(buf, beta) if g["nesterov"] else buf
            second_moment = self.second_moment_buffer() if g["normuon"] else None
            update = orthogonal_update(u, g, ns_dtype, second_moment)
            new = self.update_shard[:j]
            torch.stack(self.owned, out=new)  # the current weights (they may have been reloaded)
            apply_update(list(new.unbind(0)), update, g)
        self.gather = self.comm.all_gather(self.flat, self.update_shard)

    def finish(self) -> None:
        if self.gather is not None:
            self.gather.wait()
            self.gather = None
            n = len(self.params)
            torch._foreach_copy_([p.detach() for p in self.params], list(self.flat[:n].unbind(0)))


class RowShard(Bucket):
    """One tensor split along dim 0 (rows padded to a multiple of W): rank r owns chunk r."""

    def __init__(self, param: Tensor, comm: Comm):
        super().__init__(comm, free_grads=True)
        self.params = [param]
        W, r = comm.world_size, comm.rank
        self.rows = param.shape[0]
        self.chunk = math.ceil(self.rows / W)
        self.lo, self.hi = min(r * self.chunk, self.rows), min((r + 1) * self.chunk, self.rows)
        shard_shape = (self.chunk, *param.shape[1:])
        # The rows this rank updates: a working copy the inner AdamW steps (pad rows stay zero).
        self.shard = torch.zeros(shard_shape, dtype=param.dtype, device=param.device)
        self.shard.grad = torch.zeros_like(self.shard)
        self.padded = None
        if self.chunk * W != self.rows:  # a full-size buffer with zero pad rows
            self.padded = torch.zeros(
                (self.chunk * W, *param.shape[1:]), dtype=param.dtype, device=param.device
            )
        self.inflight: Tensor | None = None
        self.gather: Pending | None = None

    def _launch(self) -> None:
        grad = self._grads()[0]
        if self.padded is not None:
            self.padded[: self.rows].copy_(grad)
            self.padded[self.rows :].zero_()
            grad = self.padded
        self.inflight = grad.contiguous()  # kept alive until the collective is done
        self._release_grads()
        self.pending = self.comm.reduce_scatter_mean(self.shard.grad, self.inflight)

    def _done(self) -> None:
        self.inflight = None

    def reset(self) -> None:
        super().reset()
        self.inflight = None

    def local_sq_norm(self) -> Tensor:
        return self.shard.grad.float().square().sum()

    def scale_(self, factor: Tensor) -> None:
        self.shard.grad.mul_(factor.to(self.shard.grad.dtype))

    def rows_of(self, full: Tensor, fill: float = 0.0, device=None) -> Tensor:
        """This rank's rows of ``full`` (a tensor with the parameter's rows), padded to the
        chunk with ``fill``."""
        rows = torch.full(
            (self.chunk, *full.shape[1:]), fill, dtype=full.dtype, device=device or full.device
        )
        rows[: self.hi - self.lo] = full[self.lo : self.hi]
        return rows

    def load_rows(self) -> None:
        """shard <- this rank's rows of the parameter (the parameter is the truth: it may have
        been reloaded since the last step)."""
        n = self.hi - self.lo
        self.shard[:n].copy_(self.params[0].detach()[self.lo : self.hi])

    def start_gather(self) -> None:
        out = self.padded if self.padded is not None else self.params[0].detach()
        self.gather = self.comm.all_gather(out, self.shard)

    def finish(self) -> None:
        if self.gather is not None:
            self.gather.wait()
            self.gather = None
            if self.padded is not None:
                self.params[0].detach().copy_(self.padded[: self.rows])


class FlatAllReduce(Bucket):
    """Small or replicated tensors: one flat all-reduce (mean), written back into ``p.grad``."""

    def __init__(self, params: list[Tensor], comm: Comm):
        super().__init__(comm, free_grads=False)
        self.params = params
        p0 = params[0]
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)

    def _launch(self) -> None:
        views = [v.view_as(p) for v, p in zip(self._views(), self.params)]
        torch._foreach_copy_(views, self._grads())
        self.pending = self.comm.all_reduce_mean(self.flat)

    def _views(self) -> list[Tensor]:
        return list(self.flat.split([p.numel() for p in self.params]))

    def _done(self) -> None:
        for p, v in zip(self.params, self._views()):
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(v.view_as(p))

    def local_sq_norm(self) -> Tensor:
        if self.comm.rank != 0:  # replicated: counted once, by rank 0
            return torch.zeros((), device=self.flat.device)
        return self.flat.float().square().sum()

    def scale_(self, factor: Tensor) -> None:
        torch._foreach_mul_([p.grad for p in self.params], factor.to(self.flat.dtype))


def flat_buckets(params: list[Tensor], comm: Comm, bucket_bytes: int) -> list[FlatAllReduce]:
    """Consecutive params of one dtype/device packed into flat all-reduce buckets of ~bucket_bytes."""
    buckets, current, size = [], [], 0
    for p in params:
        if current and (
            size + p.numel() * p.element_size() > bucket_bytes
            or (p.dtype, p.device) != (current[0].dtype, current[0].device)
        ):
            buckets.append(FlatAllReduce(current, comm))
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
    if current:
        buckets.append(FlatAllReduce(current, comm))
    return buckets


def _packed_state_dict(opt: torch.optim.Optimizer) -> dict:
    """torch's state_dict layout (param_groups with parameter indices), with no state yet."""
    saved_state, opt.state = opt.state, {}
    try:
        packed = torch.optim.Optimizer.state_dict(opt)
    finally:
        opt.state = saved_state
    packed["state"] = {}
    return packed


def _saved_states(opt: torch.optim.Optimizer, state_dict: dict) -> dict[int, dict]:
    """id(param) -> its saved state; checks that the groups line up."""
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise OptimizerError(
            f"{type(opt).__name__} state has groups of {saved_sizes} tensors, this has {sizes}"
        )
    out = {}
    for group, saved in zip(groups, saved_groups):
        for p, pid in zip(group["params"], saved["params"]):
            if pid in state_dict["state"]:
                out[id(p)] = state_dict["state"][pid]
        group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
    return out


def _gathered(comm: Comm, local: Tensor) -> Tensor:
    """Every rank's ``local`` (same shape everywhere), concatenated along dim 0."""
    out = torch.empty(
        (comm.world_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
    )
    if comm.local_only:
        raise OptimizerError("state_dict() needs real collectives (comm.local_only is set)")
    comm.all_gather(out, local.contiguous()).wait()
    return out


class BucketedStep:
    """``step()`` of a sharded optimizer: start every bucket's reduction, update each bucket as
    its gradients arrive (which starts its all-gather), then wait for the gathers.

    Subclasses provide ``buckets``, ``update_bucket(bucket)`` and ``finish()``.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for bucket in self.buckets:
            bucket.launch()
        for bucket in self.buckets:
            self.update_bucket(bucket)
        self.finish()
        return loss


# ---------------------------------------------------------------- DistributedMuon
class DistributedMuon(BucketedStep, Muon):
    """Muon with gradients reduce-scattered by blocks of whole matrices; see the module doc.

    Same hyperparameters, same math and the same checkpoint format as ``Muon``; momentum lives
    only on the rank that owns a matrix.
    """

    state_kind = "Muon"

    def __init__(self, params: Iterable, comm: Comm, bucket_bytes: int = BUCKET_BYTES, **kwargs):
        super().__init__(params, **kwargs)
        self.comm = comm
        self.has_state = False  # momentum exists (after the first step); equal on every rank
        self.blocks: list[MatrixBlock] = []
        for group, chunk, k in owner_blocks(self.param_groups, comm.world_size, bucket_bytes):
            self.blocks.append(MatrixBlock(chunk, group, k, comm))

    @property
    def buckets(self) -> list[Bucket]:
        return list(self.blocks)

    def update_bucket(self, block: MatrixBlock) -> None:
        """Wait for the block's gradients, update the owned matrices, start the all-gather."""
        block.wait()
        block.update(self.ns_dtype)
        self.has_state = True

    def finish(self) -> None:
        for block in self.blocks:
            block.finish()
            block.reset()

    def state_dict(self) -> dict:
        """Collective: every rank gets the ``Muon.state_dict()`` of the whole model (CPU)."""
        packed = _packed_state_dict(self)
        if not self.has_state:  # the same on every rank: before the first step, or a fresh load
            return packed
        index = {id(p): i for i, p in enumerate(chain(*(g["params"] for g in self.param_groups)))}
        for block in self.blocks:
            states: dict[str, Tensor] = {"momentum_buffer": block.momentum_buffer()}
            if block.group["normuon"]:
                states["second_moment"] = block.second_moment_buffer()
            for key, owned in states.items():
                local = torch.zeros(
                    (block.k, *owned.shape[1:]), dtype=owned.dtype, device=owned.device
                )
                local[: len(block.owned)] = owned
                full = _gathered(self.comm, local)
                for i, p in enumerate(block.params):
                    packed["state"].setdefault(index[id(p)], {})[key] = full[i].cpu()
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep this rank's part of a ``Muon`` state (saved with any number of ranks)."""
        saved = _saved_states(self, state_dict)  # updates the live groups: no key goes missing
        for block in self.blocks:
            block.momentum = block.second_moment = None
            for j, p in enumerate(block.owned):
                state = saved.get(id(p), {})
                if "momentum_buffer" in state:
                    block.momentum_buffer()[j].copy_(state["momentum_buffer"])
                if "second_moment" in state:
                    block.second_moment_buffer()[j].copy_(state["second_moment"])
        self.has_state = bool(saved)


# ---------------------------------------------------------------- ZeRO2AdamW
class ZeRO2AdamW(BucketedStep, torch.optim.Optimizer):
    """AdamW whose moments exist only for this rank's rows; see the module doc.

    ``param_groups`` are AdamW groups (``lr``, ``betas``, ``eps``, ``weight_decay``, ...); each
    bucket (one sharded tensor, or a flat bucket of small ones) has an inner ``torch.optim.AdamW``
    over what this rank updates, handed its group's values at every step, so schedules work as
    usual and each bucket can be updated as soon as its gradients arrive. The checkpoint format
    is ``torch.optim.AdamW``'s.
    """

    state_kind = "AdamW"

    def __init__(
        self,
        params: Iterable,
        comm: Comm,
        defaults: dict | None = None,
        min_shard_numel: int = MIN_SHARD_NUMEL,
        bucket_bytes: int = BUCKET_BYTES,
    ):
        defaults = dict(defaults or torch.optim.AdamW([torch.zeros(1)]).defaults)
        super().__init__(params, defaults)
        self.comm = comm
        self.shards: list[RowShard] = []
        self.replicated: list[FlatAllReduce] = []
        self.inner: dict[int, torch.optim.AdamW] = {}  # id(bucket) -> AdamW over its tensors
        self.group_of: dict[int, dict] = {}  # id(bucket) -> its param group
        self.where: dict[int, tuple[Bucket, Tensor]] = {}  # id(param) -> bucket, tensor stepped
        for group in self.param_groups:
            if group.get("amsgrad"):
                raise OptimizerError("ZeRO2AdamW does not support amsgrad")
            small = []
            for p in group["params"]:
                if p.numel() >= min_shard_numel:
                    shard = RowShard(p, comm)
                    self.shards.append(shard)
                    self._add(shard, group, [shard.shard])
                    self.where[id(p)] = (shard, shard.shard)
                else:
                    small.append(p)
            for bucket in flat_buckets(small[::-1], comm, bucket_bytes):
                self.replicated.append(bucket)
                self._add(bucket, group, bucket.params)
                self.where.update({id(p): (bucket, p) for p in bucket.params})

    def _add(self, bucket: Bucket, group: dict, tensors: list[Tensor]) -> None:
        self.inner[id(bucket)] = torch.optim.AdamW([{**self._hyper(group), "params": tensors}])
        self.group_of[id(bucket)] = group

    @staticmethod
    def _hyper(group: dict) -> dict:
        return {k: v for k, v in group.items() if k not in ("params", "param_names")}

    @property
    def buckets(self) -> list[Bucket]:
        return [*self.shards, *self.replicated]

    def update_bucket(self, bucket: Bucket) -> None:
        """Wait for the bucket's gradients, update this rank's part, start the all-gather."""
        bucket.wait()
        inner = self.inner[id(bucket)]
        inner.param_groups[0].update(self._hyper(self.group_of[id(bucket)]))
        if isinstance(bucket, RowShard):
            bucket.load_rows()
        inner.step()
        if isinstance(bucket, RowShard):
            bucket.start_gather()

    def finish(self) -> None:
        for shard in self.shards:
            shard.finish()
        for bucket in self.buckets:
            bucket.reset()

    def local_state(self) -> list[dict]:
        return [dict(inner.state) for inner in self.inner.values()]

    def state_dict(self) -> dict:
        """Collective: every rank gets the ``torch.optim.AdamW`` state of the whole model (CPU)."""
        packed = _packed_state_dict(self)
        params = chain(*(g["params"] for g in self.param_groups))
        for i, p in enumerate(params):
            bucket, stepped = self.where[id(p)]
            state = self.inner[id(bucket)].state.get(stepped)
            if not state:  # the same on every rank: state appears at the first step
                continue
            out = {"step": state["step"].detach().to("cpu", torch.float32).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                value = state[key]
                if isinstance(bucket, RowShard):
                    value = _gathered(self.comm, value)[: p.shape[0]]
                out[key] = value.detach().to("cpu", copy=True)
            packed["state"][i] = out
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep this rank's rows of a ``torch.optim.AdamW`` state (saved with any number of ranks)."""
        saved = _saved_states(self, state_dict)
        for bucket in self.buckets:
            inner = self.inner[id(bucket)]
            inner_state = {}
            for j, p in enumerate(bucket.params):
                if id(p) not in saved:
                    continue
                # copies: torch would keep the caller's tensors (e.g. a live optimizer's) as state
                s = {k: v.clone() if isinstance(v, Tensor) else v for k, v in saved[id(p)].items()}
                if isinstance(bucket, RowShard):
                    for key in ("exp_avg", "exp_avg_sq"):
                        s[key] = bucket.rows_of(s[key], device="cpu")
                inner_state[j] = s
            groups = inner.state_dict()["param_groups"]
            inner.load_state_dict({"state": inner_state, "param_groups": groups})


# ---------------------------------------------------------------- launching during backward
class GradReducer:
    """Launches every bucket's collective once per step, in one fixed order on every rank.

    The order is the one backward is expected to finish the buckets in: by the earliest
    (in ``model.parameters()`` order) of their parameters, latest first. ``arm()`` makes the next
    backward launch each bucket as soon as its last gradient is accumulated (post-accumulate-grad
    hooks); a bucket that is ready before its predecessors waits for them.
    """

    def __init__(self, buckets: list[Bucket], model: nn.Module):
        position = {id(p): i for i, p in enumerate(model.parameters())}
        self.buckets = sorted(buckets, key=lambda b: -min(position[id(p)] for p in b.params))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        if len(self.bucket_of) != sum(len(b.params) for b in self.buckets):
            raise AssertionError("a parameter is in two gradient buckets")
        self.armed = False
        self.next = 0  # buckets[:next] are launched
        self.hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for b in self.buckets
            for p in b.params
        ]

    def arm(self) -> None:
        """The next backward produces the final gradients of this step."""
        self.armed = True
        for b in self.buckets:
            b.remaining = len(b.params)

    def _on_grad(self, p: Tensor) -> None:
        if not self.armed:
            return
        bucket = self.bucket_of[id(p)]
        bucket.remaining -= 1
        while self.next < len(self.buckets) and self.buckets[self.next].remaining <= 0:
            self.buckets[self.next].launch()
            self.next += 1

    def launch_all(self) -> None:
        self.armed = False
        for b in self.buckets:
            b.launch()
        self.next = len(self.buckets)

    def reset(self) -> None:
        self.armed, self.next = False, 0
        for b in self.buckets:
            b.reset()

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class DistributedCombinedOptimizer(CombinedOptimizer):
    """``CombinedOptimizer`` over sharded optimizers (and replicated ones: those without a sharded form).

    ``step()`` walks the buckets of all optimizers in the order their collectives were launched:
    each sharded bucket is updated and its all-gather started as soon as its reduction is done
    (the head's AdamW all-gather overlaps Muon's Newton-Schulz, the embedding's reduce-scatter,
    launched last in backward, overlaps it too); a replicated optimizer steps once its last
    bucket is in. The all-gathers are waited for at the end.
    """

    overlap_side_steps = False  # its own step orders the buckets and their collectives

    def __init__(
        self,
        optimizers: list,
        owner: dict[int, Any],
        reducer: GradReducer,
        comm: Comm,
        **kwargs,
    ):
        super().__init__(optimizers, **kwargs)
        self.owner = owner  # id(bucket) -> the optimizer it belongs to
        self.reducer, self.comm = reducer, comm
        # the tied pair's row shards: ((copy's ZeRO2AdamW, RowShard), (master's ...))
        self.tie_shards = None if self.tie is None else tuple(map(self._row_shard, self.tie))
        if self.tie_shards and self.tie[0].shape != self.tie[1].shape:
            raise OptimizerError(
                f"a tied pair needs one shape, got {tuple(self.tie[0].shape)} and "
                f"{tuple(self.tie[1].shape)}"
            )
        self._folded = False  # this step's copy rows are added into the master's

    def _row_shard(self, p: Tensor) -> tuple[ZeRO2AdamW, RowShard]:
        for opt in self.optimizers:
            bucket = opt.where.get(id(p), (None,))[0] if isinstance(opt, ZeRO2AdamW) else None
            if isinstance(bucket, RowShard):
                return opt, bucket
        raise OptimizerError(
            "model.tie_embed_head under torchrun needs the embedding and the head in AdamW groups "
            "large enough to be sharded by rows (set model.tie_embed_head=false)"
        )

    def _fold_tied_grads(self) -> None:
        """While tied, the copy's reduced rows join the master's (the same rows on this rank)."""
        if not (self.tie_shards and self.tied) or self._folded:
            return
        (_, copy), (_, master) = self.tie_shards
        copy.wait()
        master.wait()
        master.shard.grad.add_(copy.shard.grad)
        copy.shard.grad.zero_()
        self._folded = True

    @torch.no_grad()
    def untie(self, row_scale: Tensor | None = None) -> None:
        """``CombinedOptimizer.untie`` on this rank's rows: the copy's AdamW starts from the
        master's step count and moments, divided by the rows' scale."""
        if self.tie_shards is None:
            raise OptimizerError("untie: this optimizer trains no tied pair")
        self.tied = False
        (copy_opt, copy), (master_opt, master) = self.tie_shards
        source = master_opt.inner[id(master)].state.get(master.shard)
        if not source:
            return  # the master has not stepped yet: a fresh start
        rows = None if row_scale is None else copy.rows_of(row_scale, 1.0, copy.shard.device)
        copy_opt.inner[id(copy)].state[copy.shard] = adamw_state_of_scaled_rows(source, rows)

    def reduce_during_next_backward(self) -> None:
        self.reducer.arm()

    @staticmethod
    def is_sharded(opt) -> bool:
        return isinstance(opt, BucketedStep)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the mean gradient (over ranks) to global norm ``max_norm``; returns the norm."""
        self.reducer.launch_all()
        for b in self.reducer.buckets:
            b.wait()
        self._fold_tied_grads()  # the norm of the one weight's gradient, as in one process
        sq = torch.stack([b.local_sq_norm().float() for b in self.reducer.buckets]).sum()
        if not self.comm.local_only:
            dist.all_reduce(sq, group=self.comm.group)
        total = sq.sqrt()
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for b in self.reducer.buckets:
            b.scale_(factor)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        self.reducer.launch_all()
        waiting = {
            id(o): sum(self.owner[id(b)] is o for b in self.reducer.buckets)
            for o in self.optimizers
        }
        tied = self.tie_shards if self.tied else None
        for bucket in self.reducer.buckets:
            opt = self.owner[id(bucket)]
            if tied and bucket is tied[0][1]:  # the copy: stepped as the master
                bucket.wait()
            elif self.is_sharded(opt):
                if tied and bucket is tied[1][1]:
                    self._fold_tied_grads()
                opt.update_bucket(bucket)
            else:
                bucket.wait()
                waiting[id(opt)] -= 1
                if waiting[id(opt)] == 0:  # replicated: all its gradients are averaged
                    opt.step()
        for opt in self.optimizers:
            if self.is_sharded(opt):
                opt.finish()
        if tied:
            self.tie[0].copy_(self.tie[1])
        self._folded = False
        self.reducer.reset()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._folded = False
        self.reducer.reset()  # a skipped step may have left collectives in flight

    def summary(self) -> str:
        W = self.comm.world_size
        lines = [super().summary(), f"  distributed over {W} ranks:"]
        for opt in self.optimizers:
            name = type(opt).__name__
            if isinstance(opt, DistributedMuon):
                n = len(opt.blocks)
                what = f"{n} blocks of whole matrices reduce-scattered; momentum on the owner"
            elif isinstance(opt, ZeRO2AdamW):
                what = (
                    f"{len(opt.shards)} tensors sharded by rows, "
                    f"{sum(len(b.params) for b in opt.replicated)} small ones all-reduced"
                )
            elif hasattr(opt, "describe"):
                what = opt.describe()
            else:
                what = "replicated: gradients all-reduced, full state on every rank"
            lines.append(f"    {name}: {what}")
        return "\n".join(lines)


def distribute(
    combined: CombinedOptimizer, model: nn.Module, group=None, bucket_bytes: int = BUCKET_BYTES
) -> DistributedCombinedOptimizer:
    """The sharded counterpart of a single-process ``CombinedOptimizer`` (same groups, same hyper-
    parameters): Muon -> DistributedMuon, AdamW -> ZeRO2AdamW, a type in ``SHARDED_FORMS`` (SOAP)
    -> its sharded form, others replicated."""
    refuse_delayed_steps(combined, "sharded")
    comm = Comm(group)
    optimizers, buckets = [], []
    for opt in combined.optimizers:
        groups = [dict(g) for g in opt.param_groups]
        if isinstance(opt, Muon):
            opt = DistributedMuon(groups, comm, bucket_bytes, **opt.defaults, ns_dtype=opt.ns_dtype)
            own = opt.buckets
        elif isinstance(opt, torch.optim.AdamW):
            opt = ZeRO2AdamW(groups, comm, defaults=opt.defaults, bucket_bytes=bucket_bytes)
            own = opt.buckets
        elif type(opt) in SHARDED_FORMS:
            opt = SHARDED_FORMS[type(opt)](opt, groups, comm, bucket_bytes)
            own = opt.buckets
        else:  # replicated: kept as it is, its gradients all-reduced
            own = flat_buckets([p for g in groups for p in g["params"]][::-1], comm, bucket_bytes)
        optimizers.append(opt)
        buckets += [(b, opt) for b in own]
    owner = {id(b): opt for b, opt in buckets}
    reducer = GradReducer([b for b, _ in buckets], model)
    return DistributedCombinedOptimizer(
        optimizers, owner, reducer, comm, header=combined.header, tie=combined.tie
    )


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: CombinedOptimizer | torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (sharded or not)."""
    total = 0
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        if isinstance(opt, DistributedMuon):
            held = [b.momentum for b in opt.blocks] + [b.second_moment for b in opt.blocks]
            total += sum(t.nbytes for t in held if t is not None)
        elif hasattr(opt, "local_state"):  # ZeRO2AdamW, DistributedSOAP
            total += tensor_bytes(opt.local_state())
        else:
            total += tensor_bytes(dict(opt.state))
    return total
