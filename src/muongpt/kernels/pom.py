"""PoM with its pointwise middle fused into Triton kernels: expansion, GELU, products, causal mean
and selection gate in one pass forward and one pass backward, no (B, T, S) fp32 tensor in HBM.

The module (``model/pom.py``) computes, for x (B, T, D), degree k, E = expand·D, S = k·E, H heads,
and u = x or its short causal convolution (PyTorch, D wide: cheap):

    [P | G] = u [W_poly; W_select]^T        one cuBLAS matmul, (B, T, S + S/H)
    a_i     = GELU(P[:, :, iE:(i+1)E])      h_i = a_1 ⊙ ... ⊙ a_i          (i = 1..k)
    m_t     = (1/(t+1)) Σ_{s<=t} h_s        z = sigmoid(G)[s // H] ⊙ m     ("mix", the kernels)
    y       = z W_proj^T                    one cuBLAS matmul

Only [P | G] (bf16), z (the proj matmul's input) and per-chunk prefix sums (fp32, S per 64
tokens) are kept for the backward; everything else is recomputed there. With dz = dy W_proj:

    dG      = Σ_heads (dz ⊙ m) ⊙ g (1 - g)
    u_t     = dz_t ⊙ g_t / (t+1)            dh_s = Σ_{t>=s} u_t   (a reverse running sum)
    c_k     = dh_k,  c_i = dh_i + c_{i+1} ⊙ a_{i+1}     da_i = c_i ⊙ h_{i-1}  (h_0 = 1)
    dP      = da ⊙ GELU'(P)

and the matmuls' own gradients (cuBLAS, by autograd). Every sum is in fp32; each output is
rounded once to the input dtype.

The time axis is cut into chunks of ``CHUNK`` tokens. One program handles one chunk of one
sequence for ``block_c`` channels of every degree (launch shapes ``FWD``, ``BWD``): a first,
light kernel writes each chunk's totals (of h forward, of u backward), PyTorch turns them into
exclusive prefix (suffix) sums across chunks, and the main kernel adds its chunk's carry to a
scan inside the chunk. So the grid is (E / block_c) x (B·T / CHUNK) programs at every T, and
T = 64K with B = 1 fills the GPU as well as T = 1K with B = 64. The single-pass kernels
(``ROW_SCAN_PROGRAMS_PER_SM``, launch shapes ``ROW_FWD``, ``ROW_BWD``) instead walk each
sequence's chunks in one program, for many short rows.

Why: compiled, the plain module spends about half its time in memory-bound pointwise kernels and
the fp32 scan, which read and write (B, T, S) tensors several times. Here the forward reads
[P | G] twice (once for the chunk totals) and writes z; the backward reads [P | G] and dz twice
and writes d[P | G]: about 24 + 42 KB per token at d = 768, k = e = 2, H = 1.

``mix`` is a ``torch.library`` custom op (with fake kernels) so ``torch.compile`` keeps the
kernels as opaque nodes; without CUDA (or Triton) it computes the same math in PyTorch. The
kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (``mix_forward_kernel``,
``mix_backward_kernel``). ``FusedPoM`` (built by the ``fused_pom`` converter) uses it where
``fused_pom_usable``; with a decoding cache it runs the plain module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt.kernels.causal_conv import causal_conv
from muongpt.kernels.triton_support import sm_count, tl, triton
from muongpt.model.attention import matmul_dtype
from muongpt.model.pom import PoM


class MixConfig(NamedTuple):
    """A launch shape of one pass (its chunk-sums kernel and its main kernel)."""

    block_c: int  # channels per degree per program (a power of 2)
    num_warps: int


CHUNK = 32  # tokens per program, both passes (the scan inside a chunk is one tl.cumsum)
# The fastest shapes at the default PoM (d = 768, degree 2, expansion 1, 4 selection heads, T = 1K,
# 65,536 tokens; benchmarks/pom_kernel_profile.py, H200, torch 2.11, 2026-12-04): forward
# 32 x 32 x 2 warps 0.51 ms, backward 32 x 32 x 4 1.10 ms; 32 x 64 x 4 forward took 0.58 ms.
FWD = MixConfig(32, 2)
BWD = MixConfig(32, 4)
# The single-pass kernels (``_mix_*_rows_kernel``): one program walks a whole sequence's chunks
# for its channels, the running totals in registers, so there is no chunk-sums kernel and no
# PyTorch cumsum, but only B · E / block_c programs, and a compilation per T. Used where that is
# at least ``ROW_SCAN_PROGRAMS_PER_SM`` programs per SM at their own launch shapes (many short
# rows). 16-channel tiles make twice the programs of 32: at the d12 experiments' 32 rows of 1K
# (11.6 programs per SM on an H200) forward 16 x 2 warps took 0.26 ms against the two-pass 0.30,
# backward 16 x 4 0.43 against 0.55; at 64 rows 0.50 and 0.78 ms against 32-channel single-pass
# tiles' 0.58 and 1.00 (pom_kernel_profile.py --row-scan, torch 2.11, 2026-12-04).
ROW_FWD = MixConfig(16, 2)
ROW_BWD = MixConfig(16, 4)
ROW_SCAN_PROGRAMS_PER_SM: float | None = 8
# The chunk-sums kernels' own launch shape (None: the main kernel's). They only stream [P | G]
# (and dz) into per-chunk totals, at about a third of the bandwidth with 32-channel tiles (T = 4K,
# H200, 2026-12-04); wider tiles may stream better, not yet timed (``pom_kernel_profile.py
# --sums-shapes``).
SUMS: MixConfig | None = None
# The convolution (``pom_conv``) by ``kernels/causal_conv.py`` instead of the module's PyTorch:
# slower, so off. One layer at 32 x 1K took 103 ns/token with it against 84 without; its backward
# kernel alone took 319 us (pom_vs_attention.py --fused-conv, H200, torch 2.11, 2026-12-04).
FUSED_CONV = False


# ---------------------------------------------------------------- reference (PyTorch)
def mix_reference(pg: Tensor, degree: int, heads: int) -> Tensor:
    """z (B, T, S) from [P | G] (B, T, S + S/H), straight from the formulas, in pg's dtype
    (fp32 accumulation): the math both kernels implement."""
    B, T, W = pg.shape
    S = W * heads // (heads + 1)
    acc = torch.promote_types(pg.dtype, torch.float32)
    p, g = pg[..., :S].to(acc), pg[..., S:].to(acc)
    a = F.gelu(p).chunk(degree, dim=-1)
    h = [a[0]]
    for a_i in a[1:]:
        h.append(h[-1] * a_i)
    h = torch.cat(h, dim=-1)
    counts = torch.arange(1, T + 1, device=pg.device, dtype=acc).view(1, T, 1)
    m = h.cumsum(dim=1) / counts
    gate = torch.sigmoid(g).repeat_interleave(heads, dim=-1)
    return (gate * m).to(pg.dtype)


def mix_backward_reference(pg: Tensor, dz: Tensor, degree: int, heads: int) -> Tensor:
    """d[P | G] from the module docstring's backward formulas, in PyTorch (fp32 at least)."""
    B, T, W = pg.shape
    S, E = _split_widths(pg, degree, heads)
    acc = torch.promote_types(pg.dtype, torch.float32)
    p, dz = pg[..., :S].to(acc), dz.to(acc)
    g = torch.sigmoid(pg[..., S:].to(acc))
    a = F.gelu(p).chunk(degree, dim=-1)
    h = [a[0]]
    for a_i in a[1:]:
        h.append(h[-1] * a_i)
    counts = torch.arange(1, T + 1, device=pg.device, dtype=acc).view(1, T, 1)
    m = torch.cat(h, dim=-1).cumsum(dim=1) / counts
    dg = (dz * m).view(B, T, -1, heads).sum(dim=-1) * g * (1 - g)
    u = dz * g.repeat_interleave(heads, dim=-1) / counts
    dh = (u.flip(1).cumsum(dim=1).flip(1)).chunk(degree, dim=-1)
    da, c = [], None
    for i in reversed(range(degree)):
        c = dh[i] if c is None else dh[i] + c * a[i + 1]
        da.append(c * h[i - 1] if i else c)
    dp = torch.cat(da[::-1], dim=-1) * _gelu_grad_torch(p)
    return torch.cat([dp, dg], dim=-1).to(pg.dtype)


def _gelu_grad_torch(p: Tensor) -> Tensor:
    """d GELU(p) / dp = Φ(p) + p φ(p)."""
    return 0.5 * (1 + torch.erf(p * 0.5**0.5)) + p * torch.exp(-0.5 * p * p) * (2 * math.pi) ** -0.5


def _split_widths(pg: Tensor, degree: int, heads: int) -> tuple[int, int]:
    """(S, E) of pg's last dim W = S + S/H, S = degree·E."""
    W = pg.size(-1)
    if (W * heads) % (heads + 1):
        raise ValueError(f"width {W} is not S + S/{heads}")
    S = W * heads // (heads + 1)
    if S % degree or (S // degree) % heads:
        raise ValueError(f"state width {S} does not split into {degree} degrees of {heads} heads")
    return S, S // degree


def _exclusive_cumsum(sums: Tensor, reverse: bool = False) -> Tensor:
    """Σ over earlier (later, if ``reverse``) chunks, along dim 1 of (B, n, S). From the
    inclusive prefix sums I: earlier = I - sums, later = I[-1] - I. Past 64 chunks the prefix
    takes two levels of at most 32 (a long cumsum on CUDA is one serial loop per column)."""
    B, n, S = sums.shape
    if n <= 64:
        inclusive = sums.cumsum(dim=1)
    else:
        g = 32
        n_groups = -(-n // g)
        padded = F.pad(sums, (0, 0, 0, n_groups * g - n)).view(B, n_groups, g, S)
        inner = padded.cumsum(dim=2)
        before = F.pad(inner[:, :-1, -1].cumsum(dim=1), (0, 0, 1, 0))
        inclusive = inner.add_(before.unsqueeze(2)).view(B, n_groups * g, S)[:, :n]
    if reverse:
        return (inclusive[:, -1:] - inclusive).contiguous()
    return (inclusive - sums).contiguous()


# ---------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _gelu(p):
        return 0.5 * p * (1.0 + tl.erf(p * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(p):
        cdf = 0.5 * (1.0 + tl.erf(p * 0.7071067811865476))
        return cdf + p * tl.exp(-0.5 * p * p) * 0.3989422804014327

    @triton.jit
    def _tile(pid_c, pid_t, T, n_chunks, E, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Chunk pid_t (of the flattened B x n_chunks) and channel block pid_c: flat row indices
        (int64), row mask, channel offsets in a degree block, their mask, the tile's mask and
        1 / (t + 1) for the token positions t in the sequence."""
        t = (pid_t % n_chunks) * CHUNK + tl.arange(0, CHUNK)
        rows = ((pid_t // n_chunks) * T + t).to(tl.int64)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask, cmask = t < T, cols < E
        inv_count = 1.0 / (t + 1).to(tl.float32)
        return rows, rmask, cols, cmask, rmask[:, None] & cmask[None, :], inv_count

    @triton.jit
    def _gate(pg, rows, rmask, i, pid_c, E, W, S, HEADS: tl.constexpr, BLOCK_C: tl.constexpr):
        """sigmoid(G) of the gate values this tile's channels of degree i read, (CHUNK,
        BLOCK_C / HEADS) fp32: contiguous loads, one per value (channel s reads G[s // HEADS])."""
        gk = tl.arange(0, BLOCK_C // HEADS)
        gmask = rmask[:, None] & (pid_c * BLOCK_C + gk * HEADS < E)[None, :]
        gcol = S + (i * E + pid_c * BLOCK_C) // HEADS + gk
        g = tl.load(pg + rows[:, None] * W + gcol[None, :], mask=gmask, other=0.0)
        return tl.sigmoid(g.to(tl.float32))

    @triton.jit
    def _per_channel(gate, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, HEADS: tl.constexpr):
        """(CHUNK, BLOCK_C / HEADS) gate values -> (CHUNK, BLOCK_C), each repeated for its
        HEADS channels (a broadcast in registers instead of HEADS loads of one address)."""
        if HEADS == 1:
            return gate
        else:
            wide = tl.broadcast_to(gate[:, :, None], (CHUNK, BLOCK_C // HEADS, HEADS))
            return tl.reshape(wide, (CHUNK, BLOCK_C))

    @triton.jit
    def _h_sums_kernel(
        pg, sums, T, n_chunks, E, W, S,
        DEGREE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # sums[b, chunk, iE + c] = Σ_{t in chunk} h_i[t, c]
        pid_c, pid_t = tl.program_id(0), tl.program_id(1)
        rows, rmask, cols, cmask, mask, _ = _tile(pid_c, pid_t, T, n_chunks, E, CHUNK, BLOCK_C)
        h = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)
        out = sums + pid_t.to(tl.int64) * S
        for i in tl.static_range(DEGREE):
            p = tl.load(pg + rows[:, None] * W + (i * E + cols)[None, :], mask=mask, other=0.0)
            h = h * _gelu(p.to(tl.float32))
            tl.store(out + i * E + cols, tl.sum(tl.where(mask, h, 0.0), axis=0), mask=cmask)

    @triton.jit
    def _fwd_degree(
        pg, z, h, before, rows, rmask, mask, inv_count, cols, i, pid_c, E, W, S,
        HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # Degree i of one chunk: h <- h GELU(P_i), z_i[t] = gate (before + Σ_{s<=t in chunk} h[s])
        # / (t + 1). Returns h and the chunk's total of h_i.
        s = i * E + cols  # state channels
        p = tl.load(pg + rows[:, None] * W + s[None, :], mask=mask, other=0.0)
        h = h * _gelu(p.to(tl.float32))
        hm = tl.where(mask, h, 0.0)
        m = (tl.cumsum(hm, axis=0) + before[None, :]) * inv_count[:, None]
        gate = _gate(pg, rows, rmask, i, pid_c, E, W, S, HEADS, BLOCK_C)
        out = _per_channel(gate, CHUNK, BLOCK_C, HEADS) * m
        tl.store(z + rows[:, None] * S + s[None, :], out.to(z.dtype.element_ty), mask=mask)
        return h, tl.sum(hm, axis=0)

    @triton.jit
    def _mix_fwd_kernel(
        pg, prefix, z, T, n_chunks, E, W, S,
        DEGREE: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # z[t, iE + c] = sigmoid(G[t, (iE + c) // H]) (prefix + Σ_{s<=t in chunk} h_i[s, c]) / (t+1)
        pid_c, pid_t = tl.program_id(0), tl.program_id(1)
        rows, rmask, cols, cmask, mask, inv_count = _tile(
            pid_c, pid_t, T, n_chunks, E, CHUNK, BLOCK_C
        )
        h = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)
        carry = prefix + pid_t.to(tl.int64) * S
        for i in tl.static_range(DEGREE):
            before = tl.load(carry + i * E + cols, mask=cmask, other=0.0)
            h, _ = _fwd_degree(pg, z, h, before, rows, rmask, mask, inv_count, cols, i, pid_c,
                               E, W, S, HEADS, CHUNK, BLOCK_C)  # fmt: skip

    @triton.jit
    def _row(totals, degrees, i):
        """Row i of a (DEGREE_P2, BLOCK_C) table of running totals."""
        return tl.sum(tl.where(degrees[:, None] == i, totals, 0.0), axis=0)

    @triton.jit
    def _mix_fwd_rows_kernel(
        pg, prefix, z, T, E, W, S,
        N_CHUNKS: tl.constexpr, DEGREE: tl.constexpr, DEGREE_P2: tl.constexpr,
        HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # The single-pass forward: one program walks sequence b's chunks in order for BLOCK_C
        # channels of every degree, the running totals in registers; each chunk's carry (the
        # total before it) goes to prefix, as the two-level forward leaves it for the backward.
        pid_c, b = tl.program_id(0), tl.program_id(1)
        degrees = tl.arange(0, DEGREE_P2)
        totals = tl.zeros((DEGREE_P2, BLOCK_C), tl.float32)
        for n in range(N_CHUNKS):
            pid_t = b * N_CHUNKS + n
            rows, rmask, cols, cmask, mask, inv_count = _tile(
                pid_c, pid_t, T, N_CHUNKS, E, CHUNK, BLOCK_C
            )
            h = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)
            carry = prefix + pid_t.to(tl.int64) * S
            for i in tl.static_range(DEGREE):
                before = _row(totals, degrees, i)
                tl.store(carry + i * E + cols, before, mask=cmask)
                h, total = _fwd_degree(pg, z, h, before, rows, rmask, mask, inv_count, cols, i,
                                       pid_c, E, W, S, HEADS, CHUNK, BLOCK_C)  # fmt: skip
                totals = tl.where(degrees[:, None] == i, totals + total[None, :], totals)

    @triton.jit
    def _u_sums_kernel(
        pg, dz, sums, T, n_chunks, E, W, S,
        DEGREE: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # sums[b, chunk, s] = Σ_{t in chunk} dz[t, s] sigmoid(G[t, s // H]) / (t + 1)
        pid_c, pid_t = tl.program_id(0), tl.program_id(1)
        rows, rmask, cols, cmask, mask, inv_count = _tile(
            pid_c, pid_t, T, n_chunks, E, CHUNK, BLOCK_C
        )
        out = sums + pid_t.to(tl.int64) * S
        for i in tl.static_range(DEGREE):
            s = i * E + cols
            d = tl.load(dz + rows[:, None] * S + s[None, :], mask=mask, other=0.0)
            gate = _gate(pg, rows, rmask, i, pid_c, E, W, S, HEADS, BLOCK_C)
            u = d.to(tl.float32) * _per_channel(gate, CHUNK, BLOCK_C, HEADS) * inv_count[:, None]
            tl.store(out + s, tl.sum(u, axis=0), mask=cmask)

    @triton.jit
    def _bwd_degree(
        pg, dz, dpg, carry_f, rows, rmask, mask, inv_count, cols, cmask, pid_c, E, W, S,
        DEG: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # Degree DEG (i below) of one chunk, up to the mean's gradient: stores dG and returns
        # h_{i-1}, P_i, a_i = GELU(P_i) and u_i = dz_i g / (t + 1) (zero outside the tile).
        h_below = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)  # h_{i-1}, recomputed
        for j in tl.static_range(DEG):
            pj = tl.load(pg + rows[:, None] * W + (j * E + cols)[None, :], mask=mask, other=0.0)
            h_below = h_below * _gelu(pj.to(tl.float32))
        s = DEG * E + cols
        p = tl.load(pg + rows[:, None] * W + s[None, :], mask=mask, other=0.0).to(tl.float32)
        a = _gelu(p)
        h = tl.where(mask, h_below * a, 0.0)
        before = tl.load(carry_f + s, mask=cmask, other=0.0)
        m = (tl.cumsum(h, axis=0) + before[None, :]) * inv_count[:, None]
        gate = _gate(pg, rows, rmask, DEG, pid_c, E, W, S, HEADS, BLOCK_C)
        g = _per_channel(gate, CHUNK, BLOCK_C, HEADS)
        d = tl.load(dz + rows[:, None] * S + s[None, :], mask=mask, other=0.0).to(tl.float32)
        # the gate: Σ over the heads that share it
        dg = d * m
        if HEADS == 1:
            dg = dg * g * (1.0 - g)
            tl.store(dpg + rows[:, None] * W + (S + s)[None, :],
                     dg.to(dpg.dtype.element_ty), mask=mask)  # fmt: skip
        else:
            dg = tl.sum(tl.reshape(dg, (CHUNK, BLOCK_C // HEADS, HEADS)), axis=2)
            dg = dg * gate * (1.0 - gate)
            gk = tl.arange(0, BLOCK_C // HEADS)
            gmask = rmask[:, None] & (pid_c * BLOCK_C + gk * HEADS < E)[None, :]
            gcol = S + (DEG * E + pid_c * BLOCK_C) // HEADS + gk
            tl.store(dpg + rows[:, None] * W + gcol[None, :],
                     dg.to(dpg.dtype.element_ty), mask=gmask)  # fmt: skip
        u = tl.where(mask, d * g * inv_count[:, None], 0.0)
        return h_below, p, a, u

    @triton.jit
    def _bwd_products(dpg, c, a_above, h_below, p, u, after, rows, mask, s, W):
        # The mean: dh_i[s] = Σ_{t >= s} u_t, the chunk's own part plus ``after``, the later
        # chunks' total; the products: c_i = dh_i + c_{i+1} a_{i+1}, da_i = c_i h_{i-1}; stores
        # dP_i. (``after`` is read by the caller only here: loaded earlier, it costs registers.)
        dh = tl.sum(u, axis=0)[None, :] - tl.cumsum(u, axis=0) + u + after[None, :]
        c = dh + c * a_above
        dp = c * h_below * _gelu_grad(p)
        tl.store(dpg + rows[:, None] * W + s[None, :], dp.to(dpg.dtype.element_ty), mask=mask)
        return c

    @triton.jit
    def _mix_bwd_kernel(
        pg, prefix, suffix, dz, dpg, T, n_chunks, E, W, S,
        DEGREE: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # d[P | G] of one chunk x BLOCK_C channels of every degree, degrees from the top down.
        pid_c, pid_t = tl.program_id(0), tl.program_id(1)
        rows, rmask, cols, cmask, mask, inv_count = _tile(
            pid_c, pid_t, T, n_chunks, E, CHUNK, BLOCK_C
        )
        carry_f = prefix + pid_t.to(tl.int64) * S
        carry_r = suffix + pid_t.to(tl.int64) * S
        c = tl.zeros((CHUNK, BLOCK_C), tl.float32)  # dL/dh_i through the higher degrees
        a_above = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)
        for i in tl.static_range(DEGREE - 1, -1, -1):
            h_below, p, a, u = _bwd_degree(pg, dz, dpg, carry_f, rows, rmask, mask, inv_count,
                                           cols, cmask, pid_c, E, W, S, i, HEADS, CHUNK,
                                           BLOCK_C)  # fmt: skip
            s = i * E + cols
            after = tl.load(carry_r + s, mask=cmask, other=0.0)
            c = _bwd_products(dpg, c, a_above, h_below, p, u, after, rows, mask, s, W)
            a_above = a

    @triton.jit
    def _mix_bwd_rows_kernel(
        pg, prefix, dz, dpg, T, E, W, S,
        N_CHUNKS: tl.constexpr, DEGREE: tl.constexpr, DEGREE_P2: tl.constexpr,
        HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # The single-pass backward: one program walks sequence b's chunks from the last to the
        # first, the running totals of u (the reverse sums) in registers.
        pid_c, b = tl.program_id(0), tl.program_id(1)
        degrees = tl.arange(0, DEGREE_P2)
        totals = tl.zeros((DEGREE_P2, BLOCK_C), tl.float32)
        for n in range(N_CHUNKS):
            pid_t = b * N_CHUNKS + (N_CHUNKS - 1 - n)
            rows, rmask, cols, cmask, mask, inv_count = _tile(
                pid_c, pid_t, T, N_CHUNKS, E, CHUNK, BLOCK_C
            )
            carry_f = prefix + pid_t.to(tl.int64) * S
            c = tl.zeros((CHUNK, BLOCK_C), tl.float32)
            a_above = tl.full((CHUNK, BLOCK_C), 1.0, tl.float32)
            for i in tl.static_range(DEGREE - 1, -1, -1):
                h_below, p, a, u = _bwd_degree(pg, dz, dpg, carry_f, rows, rmask, mask, inv_count,
                                               cols, cmask, pid_c, E, W, S, i, HEADS, CHUNK,
                                               BLOCK_C)  # fmt: skip
                s = i * E + cols
                c = _bwd_products(dpg, c, a_above, h_below, p, u, _row(totals, degrees, i), rows,
                                  mask, s, W)  # fmt: skip
                totals = tl.where(degrees[:, None] == i, totals + tl.sum(u, axis=0)[None, :],
                                  totals)  # fmt: skip
                a_above = a


def _grid(B: int, T: int, E: int, block_c: int) -> tuple[int, int]:
    return triton.cdiv(E, block_c), B * triton.cdiv(T, CHUNK)


def _row_scan(B: int, E: int, heads: int, cfg: MixConfig, sms: int) -> bool:
    """Whether the single-pass kernels run at launch shape ``cfg`` on ``sms`` SMs."""
    if ROW_SCAN_PROGRAMS_PER_SM is None or heads > cfg.block_c:
        return False
    return B * triton.cdiv(E, cfg.block_c) >= ROW_SCAN_PROGRAMS_PER_SM * sms


def _sms(t: Tensor) -> int:
    return sm_count(t.device.index or 0) if t.is_cuda else 1


def _check_heads(heads: int, block_c: int) -> None:
    if heads & (heads - 1) or heads > block_c:
        raise ValueError(f"the kernels take a power-of-2 head count <= {block_c}, got {heads}")


def mix_forward_kernel(pg: Tensor, degree: int, heads: int) -> tuple[Tensor, Tensor]:
    """(z (B, T, S), prefix (B, T / CHUNK, S) fp32) by the Triton kernels (CUDA, or CPU under
    TRITON_INTERPRET=1); prefix[b, n] = Σ of h over the chunks before chunk n."""
    cfg = FWD
    _check_heads(heads, cfg.block_c)
    pg = pg.contiguous()
    B, T, W = pg.shape
    S, E = _split_widths(pg, degree, heads)
    n_chunks = triton.cdiv(T, CHUNK)
    if _row_scan(B, E, heads, ROW_FWD, _sms(pg)):
        prefix = torch.empty((B, n_chunks, S), device=pg.device, dtype=torch.float32)
        z = torch.empty((B, T, S), device=pg.device, dtype=pg.dtype)
        _mix_fwd_rows_kernel[(triton.cdiv(E, ROW_FWD.block_c), B)](
            pg, prefix, z, T, E, W, S,
            N_CHUNKS=n_chunks, DEGREE=degree, DEGREE_P2=triton.next_power_of_2(degree),
            HEADS=heads, CHUNK=CHUNK, BLOCK_C=ROW_FWD.block_c, num_warps=ROW_FWD.num_warps,
        )  # fmt: skip
        return z, prefix
    grid = _grid(B, T, E, cfg.block_c)
    sums = torch.empty((B, n_chunks, S), device=pg.device, dtype=torch.float32)
    scfg = SUMS or cfg
    _h_sums_kernel[_grid(B, T, E, scfg.block_c)](
        pg, sums, T, n_chunks, E, W, S,
        DEGREE=degree, CHUNK=CHUNK, BLOCK_C=scfg.block_c, num_warps=scfg.num_warps,
    )  # fmt: skip
    prefix = _exclusive_cumsum(sums)
    z = torch.empty((B, T, S), device=pg.device, dtype=pg.dtype)
    _mix_fwd_kernel[grid](
        pg, prefix, z, T, n_chunks, E, W, S,
        DEGREE=degree, HEADS=heads, CHUNK=CHUNK, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )  # fmt: skip
    return z, prefix


def mix_backward_kernel(pg: Tensor, prefix: Tensor, dz: Tensor, degree: int, heads: int) -> Tensor:
    """d[P | G] (B, T, S + S/H) in pg's dtype, by the Triton kernels."""
    cfg = BWD
    _check_heads(heads, cfg.block_c)
    pg, dz = pg.contiguous(), dz.to(pg.dtype).contiguous()
    B, T, W = pg.shape
    S, E = _split_widths(pg, degree, heads)
    n_chunks = triton.cdiv(T, CHUNK)
    dpg = torch.empty_like(pg)
    if _row_scan(B, E, heads, ROW_BWD, _sms(pg)):
        _mix_bwd_rows_kernel[(triton.cdiv(E, ROW_BWD.block_c), B)](
            pg, prefix, dz, dpg, T, E, W, S,
            N_CHUNKS=n_chunks, DEGREE=degree, DEGREE_P2=triton.next_power_of_2(degree),
            HEADS=heads, CHUNK=CHUNK, BLOCK_C=ROW_BWD.block_c, num_warps=ROW_BWD.num_warps,
        )  # fmt: skip
        return dpg
    grid = _grid(B, T, E, cfg.block_c)
    sums = torch.empty((B, n_chunks, S), device=pg.device, dtype=torch.float32)
    scfg = SUMS or cfg
    _check_heads(heads, scfg.block_c)
    _u_sums_kernel[_grid(B, T, E, scfg.block_c)](
        pg, dz, sums, T, n_chunks, E, W, S,
        DEGREE=degree, HEADS=heads, CHUNK=CHUNK, BLOCK_C=scfg.block_c, num_warps=scfg.num_warps,
    )  # fmt: skip
    suffix = _exclusive_cumsum(sums, reverse=True)
    _mix_bwd_kernel[grid](
        pg, prefix, suffix, dz, dpg, T, n_chunks, E, W, S,
        DEGREE=degree, HEADS=heads, CHUNK=CHUNK, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )  # fmt: skip
    return dpg


# ---------------------------------------------------------------- PyTorch path of the op
def _prefix_torch(pg: Tensor, degree: int, heads: int) -> Tensor:
    """The kernels' chunk prefix sums, in PyTorch (the op's saved tensor on the PyTorch path)."""
    B, T, _ = pg.shape
    S, _ = _split_widths(pg, degree, heads)
    n = -(-T // CHUNK)
    p = pg[..., :S].float()
    a = F.gelu(p).chunk(degree, dim=-1)
    h = [a[0]]
    for a_i in a[1:]:
        h.append(h[-1] * a_i)
    h = F.pad(torch.cat(h, dim=-1), (0, 0, 0, n * CHUNK - T))
    return _exclusive_cumsum(h.view(B, n, CHUNK, S).sum(dim=2))


def _use_triton(t: Tensor) -> bool:
    return triton is not None and t.is_cuda


# ---------------------------------------------------------------- the op
@torch.library.custom_op("muongpt::pom_mix_fwd", mutates_args=())
def pom_mix_fwd(pg: Tensor, degree: int, heads: int) -> tuple[Tensor, Tensor]:
    """[P | G] (B, T, S + S/H) -> (z (B, T, S), chunk prefix sums (B, T / CHUNK, S) fp32)."""
    if _use_triton(pg):
        return mix_forward_kernel(pg, degree, heads)
    return mix_reference(pg, degree, heads), _prefix_torch(pg, degree, heads)


@pom_mix_fwd.register_fake
def _pom_mix_fwd_fake(pg, degree, heads):
    B, T, _ = pg.shape
    S, _ = _split_widths(pg, degree, heads)
    n = -(-T // CHUNK)
    return pg.new_empty((B, T, S)), pg.new_empty((B, n, S), dtype=torch.float32)


@torch.library.custom_op("muongpt::pom_mix_bwd", mutates_args=())
def pom_mix_bwd(pg: Tensor, prefix: Tensor, dz: Tensor, degree: int, heads: int) -> Tensor:
    """d[P | G] from [P | G], the forward's chunk prefix sums and dz."""
    if _use_triton(pg):
        return mix_backward_kernel(pg, prefix, dz, degree, heads)
    return mix_backward_reference(pg, dz, degree, heads)


@pom_mix_bwd.register_fake
def _pom_mix_bwd_fake(pg, prefix, dz, degree, heads):
    return torch.empty_like(pg)


def _setup_context(ctx, inputs, output):
    pg, degree, heads = inputs
    _, prefix = output
    ctx.save_for_backward(pg, prefix)
    ctx.degree, ctx.heads = degree, heads
    ctx.mark_non_differentiable(prefix)
    ctx.set_materialize_grads(False)


def _backward(ctx, dz, _grad_prefix):
    pg, prefix = ctx.saved_tensors
    if dz is None:
        return None, None, None
    return pom_mix_bwd(pg, prefix, dz, ctx.degree, ctx.heads), None, None


pom_mix_fwd.register_autograd(_backward, setup_context=_setup_context)


def pom_mix(pg: Tensor, degree: int, heads: int) -> Tensor:
    """z = sigmoid(G) ⊙ causal mean of the polynomial state of P, for [P | G] (B, T, S + S/H)."""
    z, _ = pom_mix_fwd(pg, degree, heads)
    return z


# ---------------------------------------------------------------- the module
def fused_pom_usable(x: Tensor, pom: PoM) -> bool:
    """True when ``FusedPoM`` runs the kernels on ``x``: CUDA, Triton, a power-of-2 head count
    of at most the launch shapes' block_c. Safe to call inside torch.compile."""
    heads = pom.n_sel_heads
    fits = heads <= min(FWD.block_c, BWD.block_c, (SUMS or BWD).block_c)
    return triton is not None and x.is_cuda and not heads & (heads - 1) and fits


class FusedPoM(PoM):
    """The model's PoM with the pointwise middle in the Triton kernels (``pom_mix``) where
    ``fused_pom_usable``; with a decoding cache, or elsewhere, the plain module. Built by the
    ``fused_pom`` converter; keeps every Parameter of the PoM it wraps."""

    def __init__(self, pom: PoM):
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in pom.__dict__.items() if not k.startswith("_")})
        for name, p in pom.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, module in pom.named_children():
            self.add_module(name, module)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        if cache is not None or not fused_pom_usable(x, self):
            return super().forward(x, cache)
        if self.dim != x.size(-1):
            return super().forward(x)  # the plain module raises the error
        weight = torch.cat([self.poly.weight, self.select.weight])  # one matmul for P and G
        pg = F.linear(self.fused_local(x) if FUSED_CONV and self.conv else self.local(x), weight)
        z = pom_mix(pg, self.degree, self.n_sel_heads)
        return F.linear(z, self.proj.weight)

    def fused_local(self, x: Tensor) -> Tensor:
        """``local`` by the ``causal_conv`` op, u in the autocast dtype (the matmul's input)."""
        return causal_conv(x, self.conv_weight.view(self.conv, self.dim), matmul_dtype(x))
