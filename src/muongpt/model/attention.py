"""Causal self-attention with rotary position embedding, QK-norm and an optional KV cache.

q, k = rope(rmsnorm(x Wq)), rope(rmsnorm(x Wk))     v = x Wv       (per head)
y    = softmax(q k^T / sqrt(head_dim) + mask) v Wo

The mask is causal, or a whole-sequence mask (``model/masks.py``: causal within each packed
document, optionally within a window) given as a dense bool tensor or a FlexAttention BlockMask.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dimension, without a learned scale."""
    return F.rms_norm(x, (x.size(-1),))


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device (as nn.Linear),
    else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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

    def stretched(self, factor: float, context: int, alpha: float = 1.0, beta: float = 32.0):
        """A copy for windows ``factor`` times the ``context`` it was trained on, YaRN's way (Peng
        et al. 2023, arXiv:2309.00071): a frequency that turns r = context * f / 2pi times over the
        context is kept where r >= beta (it has seen every angle), divided by ``factor`` where
        r <= alpha (interpolated: the longer window maps onto angles it has seen), and blended
        linearly in r between. Zero frequencies (the unrotated dims) stay zero."""
        turns = context * self.inv_freq / (2 * math.pi)
        keep = ((turns - alpha) / (beta - alpha)).clamp(0.0, 1.0)
        out = copy.deepcopy(self)
        out.inv_freq = self.inv_freq * (keep + (1 - keep) / factor)
        out._cache = None
        return out

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of position t times each frequency, for t < ``seq_len``: (seq_len, head_dim/2)."""
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos(), freqs.sin()

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # Built in the graph, where they fuse into the rotation: a table cached by a compiled
            # graph would be one of its outputs, which CUDA graphs overwrite at the next replay.
            return self.tables(seq_len, device)
        # The tables are recomputed only when a longer sequence (or another device) shows up.
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            # Grow geometrically, so token-by-token decoding does not rebuild them at every step.
            seq_len = max(seq_len, 2 * self._cache[0] if self._cache else 0)
            self._cache = (seq_len, device, *self.tables(seq_len, device))
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


def cached_attention(
    q: Tensor, k: Tensor, v: Tensor, cache: KVCache, window: int = 0, scale: float | None = None
) -> Tensor:
    """Attention of new queries (B, H, T, hd) over the cache plus their own keys and values.

    The new queries sit at the end of the cache: query i may see keys 0 .. start + i, and with a
    ``window`` > 0 none further back than ``window`` tokens (the training window)."""
    start = cache.pos
    k, v = cache.append(k, v)
    mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(start)
    if window:
        mask &= ~torch.ones_like(mask).tril(start - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | None) -> Tensor:
    """Attention under a whole-sequence mask: a dense bool tensor goes to SDPA, a FlexAttention
    BlockMask to flex_attention."""
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, scale=scale)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, rope_base: float = 10000.0, rope_truncate=False):
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

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, self.n_head, self.head_dim, max_len, device, dtype)

    def heads(self, y: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H, head_dim)."""
        return y.view(*y.shape[:2], self.n_head, self.head_dim)

    def query_key(
        self, x: Tensor, start: int, rotary: Rotary | None = None
    ) -> tuple[Tensor, Tensor]:
        """QK-norm, then RoPE (``rotary``, default this layer's) from position ``start``:
        (B, T, H, head_dim) each."""
        rotary = rotary or self.rotary
        q, k = rms_norm(self.heads(self.q(x))), rms_norm(self.heads(self.k(x)))
        return rotary(q, start), rotary(k, start)

    def forward(self, x: Tensor, cache: KVCache | None = None, mask=None) -> Tensor:
        """``mask``: a whole-sequence mask (training, evaluation), else causal."""
        B, T, D = x.shape
        q, k = self.query_key(x, cache.pos if cache is not None else 0)
        v = self.heads(self.v(x))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is None and mask is not None:
            y = masked_attention(q, k, v, mask, None)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = cached_attention(q, k, v, cache)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))
