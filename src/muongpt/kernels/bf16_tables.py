"""Lookup tables stored in bf16, with their gradients summed in fp32.

For a table W (V, D) in bf16 and token ids i (N,), the lookup and its gradient are

    y_n    = W[i_n]                                        # bf16, as autocast uses it anyway
    dW_v   = bf16( sum_{n : i_n = v} fp32(dy_n) )          # summed in fp32, rounded once

A frequent token's row sums thousands of terms: summed in bf16 (what eager PyTorch's CPU
embedding backward does for a bf16 table) the sum stops growing once a term falls below half an
ulp of it (10,000 terms of 0.001 sum to 0.5, not 10). AdamW then keeps its moments in the
table's dtype, so the table's gradient, moments and step move half the bytes of fp32.

The plain backward sums into a dense fp32 (V, D) table, then rounds all of it: for the speed
run's bigram table (251,520 x 768) about 2 GB of zeroing, reading and writing a step, where at
most 65,536 rows are touched. ``segmented=True`` (the ``segmented_table_grads`` converter) sums
the touched rows only: the ids are sorted, each chunk of CHUNK sorted positions sums its runs of
one id with a segmented scan (fp32) and writes each run that starts and ends inside the chunk
straight into the zeroed bf16 gradient; the runs that cross a chunk's edge add their parts into
an fp32 row (zeroed first, only those rows), rounded once by a third launch. The same sums in
another order: equal to the plain form up to the order of fp32 additions (bit for bit where
those are exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt.kernels.triton_support import tl, triton, triton_runs_on

CHUNK, BLOCK_D = 32, 128  # sorted positions and columns per program


def dense_table_grad(idx: Tensor, grad: Tensor, rows: int) -> Tensor:
    """The table's gradient summed in a dense fp32 table, rounded to bf16 (the plain form)."""
    flat = grad.reshape(-1, grad.size(-1)).float()
    total = flat.new_zeros(rows, flat.size(-1))
    total.index_add_(0, idx.reshape(-1), flat)
    return total.to(torch.bfloat16)


if triton is not None:

    @triton.jit
    def _chunk_edges(ids, first, N, CH: tl.constexpr):
        """The chunk's first and last ids, and 1 where its first run continues from the chunk
        before, its last run into the chunk after (int32 scalars: flags broadcast as masks)."""
        last = tl.minimum(first + CH, N) - 1
        id_first, id_last = tl.load(ids + first), tl.load(ids + last)
        before = tl.load(ids + tl.maximum(first - 1, 0))  # the chunk's own first id if none
        after = tl.load(ids + tl.minimum(last + 1, N - 1))
        from_before = ((before == id_first) & (first > 0)).to(tl.int32)
        into_after = ((after == id_last) & (last + 1 < N)).to(tl.int32)
        return id_first, id_last, from_before, into_after

    @triton.jit
    def _as_mask(flag, n: tl.constexpr):
        """An int32 scalar flag as a boolean vector of n."""
        return tl.broadcast_to(flag, [n]) != 0

    @triton.jit
    def _zero_crossing_rows(ids, acc, N, D, CH: tl.constexpr, BD: tl.constexpr):
        first = tl.program_id(0) * CH
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        id_first, id_last, from_before, into_after = _chunk_edges(ids, first, N, CH)
        zero = tl.zeros([BD], tl.float32)
        tl.store(acc + id_first * D + cols, zero, mask=(cols < D) & _as_mask(from_before, BD))
        tl.store(acc + id_last * D + cols, zero, mask=(cols < D) & _as_mask(into_after, BD))

    @triton.jit
    def _add_where_new(v1, start1, v2, start2):
        """Segmented sum: a run restarts where ``start`` (int32: 0 or 1) is set."""
        return tl.where(start2 != 0, v2, v1 + v2), start1 | start2

    @triton.jit
    def _segment_sums(
        ids, order, dy, out, acc, N, D, CH: tl.constexpr, BD: tl.constexpr
    ):  # fmt: skip
        first = tl.program_id(0) * CH
        r = tl.arange(0, CH)
        pos = first + r
        valid = pos < N
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        in_cols = cols < D
        here = tl.load(ids + pos, mask=valid, other=-1)
        prev = tl.load(ids + pos - 1, mask=valid & (pos > 0), other=-1)
        nxt = tl.load(ids + pos + 1, mask=pos + 1 < N, other=-1)
        starts = here != prev  # a tile's scan starts afresh at its first row anyway
        ends = ((here != nxt) | (r == CH - 1)) & valid
        src = tl.load(order + pos, mask=valid, other=0)
        tile = src[:, None] * D + cols[None, :]
        v = tl.load(dy + tile, mask=valid[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        starts2 = tl.broadcast_to(starts.to(tl.int32)[:, None], (CH, BD))
        sums, _ = tl.associative_scan((v, starts2), 0, _add_where_new)
        id_first, id_last, from_before, into_after = _chunk_edges(ids, first, N, CH)
        crossing = ((here == id_first) & _as_mask(from_before, CH)) | (
            (here == id_last) & _as_mask(into_after, CH)
        )
        dst = here[:, None] * D + cols[None, :]
        keep = ends[:, None] & in_cols[None, :]
        tl.store(out + dst, sums.to(tl.bfloat16), mask=keep & ~crossing[:, None])
        tl.atomic_add(acc + dst, sums, mask=keep & crossing[:, None], sem="relaxed")

    @triton.jit
    def _round_crossing_rows(ids, acc, out, N, D, CH: tl.constexpr, BD: tl.constexpr):
        # each crossing run rounded once, by the chunk it ends in (its sum is complete by now)
        first = tl.program_id(0) * CH
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        id_first, id_last, from_before, into_after = _chunk_edges(ids, first, N, CH)
        ends_here = from_before * (1 - (id_last == id_first).to(tl.int32) * into_after)
        keep = (cols < D) & _as_mask(ends_here, BD)
        row = tl.load(acc + id_first * D + cols, mask=keep, other=0.0)
        tl.store(out + id_first * D + cols, row.to(tl.bfloat16), mask=keep)


@torch.library.custom_op("muongpt::segmented_table_grad", mutates_args=())
def segmented_table_grad(idx: Tensor, grad: Tensor, rows: int) -> Tensor:
    """The table's bf16 gradient from the touched rows only (the module docstring); the dense
    form where the kernels cannot run."""
    if not triton_runs_on(grad):
        return dense_table_grad(idx, grad, rows)
    D = grad.size(-1)
    dy = grad.reshape(-1, D).contiguous()
    ids, order = torch.sort(idx.reshape(-1))
    N = ids.numel()
    out = torch.zeros(rows, D, device=grad.device, dtype=torch.bfloat16)
    acc = torch.empty(rows, D, device=grad.device, dtype=torch.float32)  # crossing rows only
    grid = (triton.cdiv(N, CHUNK), triton.cdiv(D, BLOCK_D))
    shape = dict(CH=CHUNK, BD=BLOCK_D)
    _zero_crossing_rows[grid](ids, acc, N, D, **shape)
    _segment_sums[grid](ids, order, dy, out, acc, N, D, **shape)
    _round_crossing_rows[grid](ids, acc, out, N, D, **shape)
    return out


@segmented_table_grad.register_fake
def _segmented_table_grad_fake(idx, grad, rows):
    return grad.new_empty((rows, grad.size(-1)), dtype=torch.bfloat16)


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, weight: Tensor, segmented: bool) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows, ctx.segmented = weight.size(0), segmented
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        table_grad = segmented_table_grad if ctx.segmented else dense_table_grad
        return None, table_grad(idx, grad, ctx.rows), None


class BF16Table(nn.Module):
    """Stands in for an ``nn.Embedding``: its Parameter, converted to bf16 in place, looked up
    with the fp32-summed gradient above."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.weight = table.weight
        self.weight.data = self.weight.data.to(torch.bfloat16)
        self.segmented = False  # the segmented_table_grads converter sets it

    def forward(self, idx: Tensor) -> Tensor:
        return _Lookup.apply(idx, self.weight, self.segmented)
