"""Causal self-attention with rotary position embedding, QK-norm and an optional KV cache.

Two kernels: SDPA (cuDNN / flash, plain causal) and FlexAttention with a block mask built here by
hand from the document ids of a batch (causal, within one document, within a sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError

GATE_DIMS = 12  # input-dependent gates (attention output, token smear) read x[..., :12]


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dimension, without a learned scale."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the last dim of (B, T, H, head_dim) tensors."""

    def __init__(self, head_dim: int, base: float = 10000.0, truncate: bool = False):
        super().__init__()
        if head_dim % 2 or (truncate and head_dim % 4):
            raise MuonGPTError(
                f"rotary embedding needs a head dimension divisible by {4 if truncate else 2}, "
                f"got {head_dim}"
            )
        if truncate:  # half-truncated: head_dim/4 frequencies from 1 down to 1/base, then zeros
            inv_freq = base ** -torch.linspace(0, 1, head_dim // 4, dtype=torch.float32)
            inv_freq = torch.cat([inv_freq, torch.zeros(head_dim // 4)])
        else:
            inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # The tables are recomputed only when a longer sequence (or another device) shows up.
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            # Grow geometrically, so token-by-token decoding does not rebuild them at every step.
            seq_len = max(seq_len, 2 * self._cache[0] if self._cache else 0)
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos(), freqs.sin())
        return self._cache[2], self._cache[3]

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        T = x.size(1)
        cos, sin = self.cos_sin(start + T, x.device)
        cos = cos[start : start + T, None, :].to(x.dtype)
        sin = sin[start : start + T, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding of one layer."""

    def __init__(self, batch_size: int, n_head: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.last_key: Tensor | None = None  # key offset: the last token's key before the shift

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.size(2)
        if end > self.k.size(2):
            raise MuonGPTError(
                f"KV cache is full: {end} positions requested, {self.k.size(2)} allocated"
            )
        self.k[:, :, self.pos : end] = k
        self.v[:, :, self.pos : end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]


FLEX_BLOCK = 128  # FlexAttention's tile: masks are decided per 128 x 128 block, then per token
UNBOUNDED_WINDOW = 2**30
DENSE_MASK_LIMIT = 2**30  # elements (bytes) of the CPU path's dense mask


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(B, n, n) bool block table -> per row: the count of its True blocks and all n column
    indices, the True ones first (ascending), then the others: a permutation of each row.

    Sort-free (cumulative sums and one scatter): no ties for a sort to order wrongly."""
    taken = dense.to(torch.int32)
    counts = taken.sum(dim=-1, dtype=torch.int32)
    slot = torch.where(
        dense,
        taken.cumsum(-1) - 1,  # the k-th True block goes to slot k
        counts[..., None] + (1 - taken).cumsum(-1) - 1,  # the others after them, in order
    )
    cols = torch.arange(dense.size(-1), device=dense.device, dtype=torch.int32).expand_as(slot)
    indices = torch.empty_like(cols).scatter_(-1, slot.long(), cols)
    return counts[:, None].contiguous(), indices[:, None].contiguous()


# Built eagerly even inside a compiled model (one graph break; O((T/128)^2) small ops): compiled
# by torch 2.11's inductor, the block lists came out wrong (BlockMask.from_kv_blocks' stable
# argsort: the model's attention gradients were off, measured on H100) or failed to compile
# (a scatter). The BlockMask's tensors enter the compiled graph as inputs, as with
# create_block_mask.
@torch.compiler.disable
def document_block_mask(docs: Tensor, window: Tensor | int | None = None):
    """FlexAttention BlockMask: query q sees key k iff k <= q, same document, q - k < window.

    ``docs`` (B, T) holds each token's document number, non-decreasing along T (a running count of
    document starts). The mask is built directly at block level: a 128 x 128 block is skipped
    when no pair in it can attend, marked full when every pair can (no per-token mask evaluated),
    and partial otherwise. This costs O((T/128)^2) small ops, with no T x T tensor and no inner
    ``torch.compile`` (``create_block_mask`` compiles its own vmap). ``window`` may be a 0-dim
    tensor: changing its value does not recompile the model.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, T = docs.shape
    n = -(-T // FLEX_BLOCK)
    if n * FLEX_BLOCK != T:  # pad with the last document id; the kernel ignores positions >= T
        docs = F.pad(docs, (0, n * FLEX_BLOCK - T), mode="replicate")
    if window is None:
        window = UNBOUNDED_WINDOW
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

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv]) & (q - kv < window)

    # kv blocks of each query block (forward, dq) and query blocks of each kv block (dk, dv),
    # both from the block tables: no from_kv_blocks, whose transposition sorts
    return BlockMask(
        (T, T),
        *_ordered(partial),
        *_ordered(all_pairs),
        *_ordered(partial.mT),
        *_ordered(all_pairs.mT),
        BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK),
        mask_mod=mask_mod,
    )


def document_dense_mask(docs: Tensor, window: Tensor | int | None = None) -> Tensor:
    """The same rule as ``document_block_mask`` as a (B, 1, T, T) bool tensor, for SDPA: the CPU
    path (FlexAttention has no CPU backward), O(T^2) memory."""
    B, T = docs.shape
    if B * T * T > DENSE_MASK_LIMIT:
        raise MuonGPTError(
            f"model.attention=flex without a GPU builds a dense {B} x {T} x {T} mask "
            f"({B * T * T / 2**30:.1f} GiB): use a CUDA device or a shorter training.seq_len"
        )
    pos = torch.arange(T, device=docs.device)
    gap = pos[:, None] - pos[None, :]
    keep = (gap >= 0) & (gap < (UNBOUNDED_WINDOW if window is None else window))
    return (keep[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_head: int,
        rope_base: float = 10000.0,
        value_embed: bool = False,
        rope_truncate: bool = False,
        scale: float | None = None,
        gate: bool = False,
        key_offset: bool = False,
    ):
        super().__init__()
        if dim % n_head:
            raise MuonGPTError(f"n_embd ({dim}) must be divisible by n_head ({n_head})")
        self.n_head, self.head_dim = n_head, dim // n_head
        # Separate q, k, v matrices: Muon orthogonalizes each one on its own.
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(self.head_dim, rope_base, rope_truncate)
        # Key offset: the unrotated dims of token t's key come from token t-1, so one layer can
        # match "the token after an earlier copy of the current one" (an induction head).
        if key_offset and not rope_truncate:
            raise MuonGPTError("model.key_offset needs model.rope_truncate (unrotated key dims)")
        self.key_offset = key_offset
        self.scale = scale  # None: 1 / sqrt(head_dim)
        # v <- a v + b ve with a value embedding ve of the tokens (GPT(value_embeds=n))
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_embed else None
        # Output gate: head h's output times sigmoid(w_h . x[:GATE_DIMS]) (starts at 0.5 each).
        # Lets a head switch itself off for a token instead of attending somewhere harmless.
        self.gate = nn.Linear(GATE_DIMS, n_head, bias=False) if gate else None
        if self.gate is not None:
            if dim < GATE_DIMS:
                raise MuonGPTError(f"attention gate needs n_embd >= {GATE_DIMS}, got {dim}")
            nn.init.zeros_(self.gate.weight)

    def offset_keys(self, k: Tensor, cache: KVCache | None) -> Tensor:
        """Shift the unrotated dims of the keys (B, T, H, hd) one token later: with a
        half-truncated RoPE those are the last quarter of each half, [hd/4, hd/2) and
        [3hd/4, hd). The first token gets zeros there (or, decoding, the cached last key's)."""
        B, T, H, hd = k.shape
        halves = k.view(B, T, H, 2, hd // 2)
        rotated, still = halves[..., : hd // 4], halves[..., hd // 4 :]
        first = torch.zeros_like(still[:, :1])
        if cache is not None:
            if cache.last_key is not None:
                first = cache.last_key
            cache.last_key = still[:, -1:]
        shifted = torch.cat([first, still[:, :-1]], dim=1)
        return torch.cat([rotated, shifted], dim=-1).view(B, T, H, hd)

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, self.n_head, self.head_dim, max_len, device, dtype)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        ve: Tensor | None = None,
        block_mask=None,
        window: int = 0,
    ) -> Tensor:
        """``block_mask``: a FlexAttention BlockMask, or a dense bool mask (B, 1, T, T) for SDPA,
        over the whole sequence; ``window``: the sliding window applied when decoding with a cache
        (0 = unbounded)."""
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_head, self.head_dim)
        v = self.v(x)
        if self.ve_lambdas is not None and ve is not None:
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve.to(v.dtype)
        v = v.view(B, T, self.n_head, self.head_dim)
        start = cache.pos if cache is not None else 0
        q, k = (
            self.rotary(rms_norm(q), start),
            self.rotary(rms_norm(k), start),
        )  # QK-norm, then RoPE
        if self.key_offset:
            k = self.offset_keys(k, cache)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if isinstance(block_mask, Tensor) and cache is None:  # the dense form (CPU)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, scale=self.scale)
        elif block_mask is not None and cache is None:  # FlexAttention: document mask / window
            from torch.nn.attention.flex_attention import flex_attention

            y = flex_attention(q, k, v, block_mask=block_mask, scale=self.scale)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            k, v = cache.append(k, v)
            # New queries sit at the end of the cache: query i may see keys 0 .. start + i.
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start)
            if window:  # and not further back than the training window
                mask &= ~torch.ones_like(mask).tril(start - window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2)  # (B, T, H, hd)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x[..., :GATE_DIMS])).unsqueeze(-1).to(y.dtype)
        return self.proj(y.reshape(B, T, D))
