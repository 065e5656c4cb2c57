"""PoM, the Polynomial Mixer (Picard et al. 2024), as a causal token mixer that runs in O(T).

For x of shape (B, T, D), with degree k, expansion e and state width S = k·e·D:

    u_t        = Σ_{j<c} w_j ⊙ x_{t-j}        short causal depthwise convolution (c = conv;
                                              x_{<0} = 0; u = x when conv = 0)
    a_1 .. a_k = chunks of GELU(u W_poly)     each of width e·D (one matmul, D -> S)
    h_i        = a_1 ⊙ a_2 ⊙ ... ⊙ a_i         the degree-i part of the polynomial state
    H_t        = [h_1, ..., h_k]_t            the state of token t, width S
    m_t        = (1/t) Σ_{s <= t} H_s         causal running mean, by cumulative sums in fp32
    g_t        = sigmoid(u_t W_select)        selection gate of width S / n_sel_heads
    y_t        = (g_t ⊙ m_t) W_proj           back to width D; W_proj starts at zero

Selection heads: the state is read as n_sel_heads heads that share one gate vector, like
multi-query attention shares its keys: state channel j·H + h (head h, H = n_sel_heads) is
gated by g_j. n_sel_heads = 1 is the paper's per-channel selection; more heads make the gate
H times cheaper. This is what the pomgpt fork's ``n_head`` does to the gate (it also made the
polynomial projection block-diagonal per head; here that projection stays dense). dim must be
divisible by n_sel_heads, so every group of channels sharing a gate value lies inside one
degree chunk.

Position: the causal mean is blind to order (only its 1/t weight knows where t is), so a pure
PoM stack would see a bag of earlier tokens. The convolution gives each token's state and gate
its last c - 1 neighbours, in order (as the short convolutions before Mamba's and H3's scans
do); it starts as the identity (w_0 = 1, the rest 0) and is kept as one 1-D parameter of c·D
values, so the optimizer trains it as a gain vector (AdamW), not as a matrix.

Choices: no biases; the output projection starts at zero (a new block is the identity);
exact (erf) GELU as in the paper. No T x T tensor is ever formed: time and memory are linear
in T, and decoding carries a constant-size state (``PoMCache``) per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError
from muongpt.model.attention import matmul_dtype


@dataclass
class PoMCache:
    """Decoding state of one PoM layer: sum of the polynomial states seen so far, their count, and
    the last conv - 1 inputs (for the convolution; None without one).

    ``sum`` has shape (B, S) and is kept in fp32 (float64 for a float64 module): its memory does
    not grow with the length of the text. All rows of the batch have seen ``count`` tokens.
    ``tail`` (B, conv - 1, D) starts at zeros, as the convolution's padding before token 0.
    """

    sum: Tensor
    count: int = 0
    tail: Tensor | None = None


def causal_mean(
    h: Tensor, prev_sum: Tensor | None = None, prev_count: int = 0, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Mean of h (B, T, S) over positions <= t, continuing after ``prev_count`` earlier tokens.

    Returns (means (B, T, S) in h's dtype, total sum (B, S) in the accumulation dtype). Sums
    accumulate in at least fp32, whatever h's dtype. The scan has two levels, prefix sums within
    chunks of ``chunk`` positions and then across the chunk totals, so it stays parallel for any
    T: a single cumsum over a long T on CUDA runs one serial loop per (batch, channel).
    """
    B, T, S = h.shape
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    L = min(chunk, T)
    n_chunks = -(-T // L)
    if n_chunks * L != T:
        h = F.pad(h, (0, 0, 0, n_chunks * L - T))  # zeros at the end change no prefix sum
    sums = torch.cumsum(h.reshape(B, n_chunks, L, S), dim=2, dtype=acc_dtype)
    # Sum of everything before each chunk: exclusive prefix sum of the chunk totals (+ the cache).
    before = F.pad(torch.cumsum(sums[:, :-1, -1], dim=1), (0, 0, 1, 0))  # (B, n_chunks, S)
    if prev_sum is not None:
        before = before + prev_sum.to(acc_dtype).unsqueeze(1)
    # In place from here on: the one fp32 (B, T, S) buffer is the only large temporary.
    sums = sums.add_(before.unsqueeze(2)).view(B, n_chunks * L, S)
    total = sums[:, T - 1].clone()
    counts = torch.arange(
        prev_count + 1, prev_count + n_chunks * L + 1, device=h.device, dtype=acc_dtype
    )
    means = sums.div_(counts.view(1, -1, 1))[:, :T].to(h.dtype)
    return means, total


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MuonGPTError(f"PoM {name} must be an integer >= 1, got {value!r}")


class PoM(nn.Module):
    """Causal Polynomial Mixer: a drop-in replacement for causal self-attention.

    ``forward(x)`` mixes x (B, T, D) over positions <= t. ``forward(x, cache)`` treats x as the
    next t tokens after those already folded into ``cache`` (from ``new_cache``) and updates the
    cache in place; the cache carries no gradient.
    """

    def __init__(
        self,
        dim: int,
        degree: int,
        expand: int,
        n_sel_heads: int = 1,
        *,
        conv: int = 0,
        scan_chunk: int = 256,
    ):
        super().__init__()
        if isinstance(conv, bool) or not isinstance(conv, int) or conv < 0:
            raise MuonGPTError(f"PoM conv must be an integer >= 0 (0 = none), got {conv!r}")
        for name, value in (
            ("dim", dim),
            ("degree", degree),
            ("expand", expand),
            ("n_sel_heads", n_sel_heads),
            ("scan_chunk", scan_chunk),
        ):
            _check_positive_int(name, value)
        if dim % n_sel_heads:
            raise MuonGPTError(f"PoM dim ({dim}) must be divisible by n_sel_heads ({n_sel_heads})")
        self.dim, self.degree, self.expand, self.n_sel_heads = dim, degree, expand, n_sel_heads
        self.state_dim = degree * expand * dim
        self.conv, self.scan_chunk = conv, scan_chunk
        # tap j (weight of x_{t-j}) is conv_weight[j·D : (j+1)·D]
        self.conv_weight = nn.Parameter(torch.empty(conv * dim)) if conv else None
        # Separate matrices (not one fused matmul) so that Muon orthogonalizes each on its own.
        self.poly = nn.Linear(dim, self.state_dim, bias=False)
        self.select = nn.Linear(dim, self.state_dim // n_sel_heads, bias=False)
        self.proj = nn.Linear(self.state_dim, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The project's uniform init with std 0.5/sqrt(fan_in); the output projection at zero.
        for linear in (self.poly, self.select):
            bound = math.sqrt(3) * 0.5 / math.sqrt(linear.in_features)
            nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.zeros_(self.proj.weight)
        if self.conv_weight is not None:  # the identity: u = x
            self.conv_weight.zero_()[: self.dim] = 1.0

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, degree={self.degree}, expand={self.expand}, "
            f"n_sel_heads={self.n_sel_heads}, conv={self.conv}, state_dim={self.state_dim}"
        )

    def new_cache(self, batch_size: int, device: torch.device | str | None = None) -> PoMCache:
        """An empty decoding state: (batch_size, state_dim) zeros in the accumulation dtype."""
        weight = self.poly.weight
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        device = weight.device if device is None else device
        total = torch.zeros(batch_size, self.state_dim, device=device, dtype=acc_dtype)
        tail = None
        if self.conv:
            tail = torch.zeros(
                batch_size, self.conv - 1, self.dim, device=device, dtype=weight.dtype
            )
        return PoMCache(total, tail=tail)

    def local(self, x: Tensor, cache: PoMCache | None = None) -> Tensor:
        """u = the causal depthwise convolution of x (x itself without one); with a cache, x
        continues after the cache's tail, which is then advanced to x's last conv - 1 tokens."""
        if not self.conv:
            return x
        x = x.to(matmul_dtype(x))  # the matmuls round u anyway: half the bytes under autocast
        B, T, D = x.shape
        k = self.conv
        past = x.new_zeros(B, k - 1, D) if cache is None else cache.tail.to(x.dtype)
        padded = torch.cat([past, x], dim=1)  # padded[:, j + t] = x_{t - (k - 1 - j)}
        w = self.conv_weight.to(x.dtype).view(k, D)
        u = w[0] * x
        for j in range(1, k):
            u = u + w[j] * padded[:, k - 1 - j : k - 1 - j + T]
        if cache is not None and k > 1:
            with torch.no_grad():
                cache.tail.copy_(padded[:, T:])
        return u

    def polynomial_state(self, x: Tensor) -> Tensor:
        """H (B, T, S): chunk i is the running product of GELU(chunk 1 .. i) of x W_poly."""
        a = F.gelu(self.poly(x)).chunk(self.degree, dim=-1)
        h = [a[0]]
        for a_i in a[1:]:
            h.append(h[-1] * a_i)
        return torch.cat(h, dim=-1) if self.degree > 1 else h[0]

    def check_cache(self, cache: PoMCache, batch_size: int) -> None:
        expected = (batch_size, self.state_dim)
        if tuple(cache.sum.shape) != expected:
            raise MuonGPTError(f"PoM cache has shape {tuple(cache.sum.shape)}, expected {expected}")
        tail = None if cache.tail is None else tuple(cache.tail.shape)
        expected = (batch_size, self.conv - 1, self.dim) if self.conv else None
        if tail != expected:
            raise MuonGPTError(f"PoM cache tail has shape {tail}, expected {expected}")

    def forward(self, x: Tensor, cache: PoMCache | None = None) -> Tensor:
        B, T, D = x.shape
        if self.dim != D:
            raise MuonGPTError(f"PoM expects inputs of width {self.dim}, got {D}")
        if cache is not None:
            self.check_cache(cache, B)
        x = self.local(x, cache)
        h = self.polynomial_state(x)
        if cache is None:
            m, _ = causal_mean(h, chunk=self.scan_chunk)
        else:
            m, total = causal_mean(h, cache.sum, cache.count, chunk=self.scan_chunk)
            with torch.no_grad():
                cache.sum.copy_(total)
            cache.count += T
        gate = torch.sigmoid(self.select(x))  # (B, T, S / H)
        y = m.reshape(B, T, -1, self.n_sel_heads) * gate.unsqueeze(-1)
        return self.proj(y.reshape(B, T, self.state_dim))
