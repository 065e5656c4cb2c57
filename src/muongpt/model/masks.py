"""Attention masks of packed batches: causal, within one document, within a sliding window.

Two forms of one rule (query q sees key k iff k <= q, same document, q - k < window): a dense
(B, 1, T, T) bool tensor for SDPA (any device, O(T^2) memory), and a FlexAttention BlockMask built
by hand at the level of 128 x 128 tiles (GPU; what the ``flex_attention`` converter selects).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from muongpt import MuonGPTError

FLEX_BLOCK = 128  # FlexAttention's tile: masks are decided per 128 x 128 block, then per token
UNBOUNDED_WINDOW = 2**30
DENSE_MASK_LIMIT = 2**30  # elements (bytes) of the CPU path's dense mask


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(B, n, n) bool block table -> per row: the count of its True blocks and all n column
    indices, the True ones first (ascending), then the others: a permutation of each row.

    With c_j the running count of True blocks up to column j, the k-th True block (from 1) is
    the first j with c_j >= k: a binary search of the non-decreasing c, no sort and no scatter
    (both miscompiled or failed in inductor), so the same code runs eagerly and in a graph."""
    taken = dense.to(torch.int32)
    trues, falses = taken.cumsum(-1, dtype=torch.int32), (1 - taken).cumsum(-1, dtype=torch.int32)
    counts = trues[..., -1:]  # (B, n, 1)
    slot = torch.arange(1, dense.size(-1) + 1, device=dense.device, dtype=torch.int32)
    slot = slot.expand_as(trues).contiguous()
    indices = torch.where(
        slot <= counts,
        torch.searchsorted(trues, slot, out_int32=True),  # the slot-th True block
        torch.searchsorted(falses, slot - counts, out_int32=True),  # then the others, in order
    )
    return counts[..., 0][:, None].contiguous(), indices[:, None].contiguous()


def block_lists(docs: Tensor, window: Tensor | int) -> tuple[Tensor, ...]:
    """The BlockMask's block lists for ``docs`` (B, n * FLEX_BLOCK) and ``window``: (count,
    indices) of the partial and of the full key blocks of each query block, then of the query
    blocks of each key block. A 128 x 128 block is skipped when no pair in it can attend, full when
    every pair can (no per-token mask evaluated), partial otherwise: O((T/128)^2) small ops."""
    B, T = docs.shape
    n = T // FLEX_BLOCK
    blocks = docs.view(B, n, FLEX_BLOCK)
    first, last = blocks[..., 0], blocks[..., -1]  # smallest and largest document of each block
    i = torch.arange(n, device=docs.device)
    gap = (i[:, None] - i[None, :]) * FLEX_BLOCK  # query block start - key block start
    # some pair visible: causal (i >= j), nearest pair inside the window, documents overlap
    any_pair = (gap >= 0) & (gap - (FLEX_BLOCK - 1) < window)
    any_pair = any_pair[None] & (first[:, :, None] <= last[:, None, :])
    # every pair visible: strictly below the diagonal, farthest pair inside the window, and the
    # key block's first token in the same document as the query block's last one
    all_pairs = (gap > 0) & (gap + (FLEX_BLOCK - 1) < window)
    all_pairs = all_pairs[None] & (last[:, :, None] == first[:, None, :])
    partial = any_pair & ~all_pairs
    # kv blocks of each query block (forward, dq) and query blocks of each kv block (dk, dv),
    # both from the block tables: no from_kv_blocks, whose transposition sorts
    return (
        *_ordered(partial),
        *_ordered(all_pairs),
        *_ordered(partial.mT),
        *_ordered(all_pairs.mT),
    )


# Built eagerly even inside a compiled model (one graph break): in torch 2.11's inductor on CUDA,
# BlockMask.from_kv_blocks' stable argsort gave wrong block lists and a scatter failed to compile
# (H100, 2026-11-22), and with this builder traced into the model's graph the flex kernel gave
# wrong attention (H200, 2026-12-05) although the traced lists were exact, on CUDA as on the CPU.
# The BlockMask's tensors enter flex_attention as with create_block_mask.
def document_block_mask(docs: Tensor, window: Tensor | int | None = None, lists=block_lists):
    """FlexAttention BlockMask: query q sees key k iff k <= q, same document, q - k < window.

    ``docs`` (B, T) holds each token's document number, non-decreasing along T (a running count of
    document starts). The block lists come from ``lists`` (``block_lists``, or its compiled form),
    with no T x T tensor and no inner ``create_block_mask`` (which compiles its own vmap).
    ``window`` may be a 0-dim tensor: changing its value does not recompile the model.
    """
    from torch.nn.attention.flex_attention import BlockMask

    T = docs.size(1)
    n = -(-T // FLEX_BLOCK)
    if n * FLEX_BLOCK != T:  # pad with the last document id; the kernel ignores positions >= T
        docs = F.pad(docs, (0, n * FLEX_BLOCK - T), mode="replicate")
    if window is None:
        window = UNBOUNDED_WINDOW

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv]) & (q - kv < window)

    return BlockMask(
        (T, T), *lists(docs, window), BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK), mask_mod=mask_mod
    )


@functools.cache
def compiled_block_lists():
    """``block_lists`` compiled as a graph of its own (about 60 small eager kernels per mask
    become a few fused ones), its outputs materialized before the BlockMask is assembled, as the
    eager lists are: the flex kernel never reads lists traced into its own graph."""
    return torch.compile(block_lists, fullgraph=True, dynamic=False)


def compiled_lists_block_mask(docs: Tensor, window: Tensor | int | None = None):
    """``document_block_mask`` with the compiled block lists."""
    return document_block_mask(docs, window, lists=compiled_block_lists())


def document_dense_mask(docs: Tensor, window: Tensor | int | None = None) -> Tensor:
    """The same rule as ``document_block_mask`` as a (B, 1, T, T) bool tensor, for SDPA: the CPU
    path (FlexAttention has no CPU backward), O(T^2) memory."""
    B, T = docs.shape
    if B * T * T > DENSE_MASK_LIMIT:
        raise MuonGPTError(
            f"document-masked attention as a dense {B} x {T} x {T} mask "
            f"({B * T * T / 2**30:.1f} GiB) is too large: on a GPU use kernels.converters=[flex_attention], "
            "or a shorter training.seq_len"
        )
    pos = torch.arange(T, device=docs.device)
    gap = pos[:, None] - pos[None, :]
    keep = (gap >= 0) & (gap < (UNBOUNDED_WINDOW if window is None else window))
    return (keep[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


eager_document_block_mask = torch.compiler.disable(document_block_mask)
eager_compiled_lists_block_mask = torch.compiler.disable(compiled_lists_block_mask)


def flex_or_dense_mask(
    docs: Tensor, window: Tensor | int | None = None, block_mask=eager_document_block_mask
):
    """A BlockMask on GPU, built by ``block_mask`` (a graph break in a compiled model); on CPU,
    which has no FlexAttention backward, the dense form."""
    if docs.device.type == "cpu":
        return document_dense_mask(docs, window)
    return block_mask(docs, window)


# the builder of the compiled_block_lists converter
flex_or_dense_mask_compiled_lists = functools.partial(
    flex_or_dense_mask, block_mask=eager_compiled_lists_block_mask
)
