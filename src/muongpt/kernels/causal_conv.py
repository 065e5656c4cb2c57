"""PoM's short causal depthwise convolution in one Triton kernel each way.

For x (B, T, D) and taps w (k, D), each row on its own, x_{<0} = 0:

    u_t   = Σ_{j<k} w_j ⊙ x_{t-j}                          forward, u in ``dtype``
    dx_t  = Σ_{j<k} w_j ⊙ du_{t+j}      (t + j < T)        backward, dx in x's dtype
    dw_j  = Σ_{b, t} du_t ⊙ x_{t-j}                        fp32 partial sums per tile, then summed

Every sum is in fp32, each output rounded once. A program takes ``BLOCK_T`` tokens of one row
for ``BLOCK_D`` channels and reads the k - 1 neighbours it needs through shifted, masked loads
(cache hits), so no padded copy of x is written. ``causal_conv`` is a ``torch.library`` custom op,
opaque to torch.compile; without CUDA (or Triton) it computes the same math in PyTorch.

Why: compiled from ``PoM.local``, the convolution takes six kernels (a cast, a padded copy, the
sum, the input gradient, the weight-gradient reduction and its cast), about 7 ns/token of a
55 ns/token layer at d = 768 (one H200, torch 2.11, 2026-12-04). Here the forward reads x once
and writes u, the backward reads du and x once and writes dx and small partial sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muongpt.kernels.triton_support import tl, triton

# A tile of 32 tokens x 128 channels on 8 warps: 76 registers forward, 96 backward, no spills
# (benchmarks/pom_kernel_registers.py, sm_90, Triton 3.6); 4 warps took 168 and 148. Timed on an
# H200 (torch 2.11, 2026-12-04) the backward took 319 us at 32 x 1K x 768, slower than the compiled
# PyTorch it replaces, so kernels/pom.py's FUSED_CONV is off; the weight-gradient tiles are the
# likely cost (not profiled further).
BLOCK_T = 32  # tokens per program
BLOCK_D = 128  # channels per program
NUM_WARPS = 8


# ---------------------------------------------------------------- reference (PyTorch)
def causal_conv_reference(x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """u_t = Σ_j w_j ⊙ x_{t-j} in fp32 (float64 stays float64), rounded to ``dtype``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, wf = x.to(acc), w.to(acc)
    u = wf[0] * xf
    for j in range(1, min(w.size(0), x.size(1) + 1)):
        u[:, j:] += wf[j] * xf[:, :-j]
    return u.to(dtype)


def causal_conv_backward_reference(x: Tensor, w: Tensor, du: Tensor) -> tuple[Tensor, Tensor]:
    """(dx in x's dtype, dw (k, D) in w's dtype) of ``causal_conv_reference``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, wf, duf = x.to(acc), w.to(acc), du.to(acc)
    dx = wf[0] * duf
    dw = torch.zeros_like(wf)
    dw[0] = (duf * xf).sum(dim=(0, 1))
    for j in range(1, min(w.size(0), x.size(1) + 1)):
        dx[:, :-j] += wf[j] * duf[:, j:]
        dw[j] = (duf[:, j:] * xf[:, :-j]).sum(dim=(0, 1))
    return dx.to(x.dtype), dw.to(w.dtype)


# ---------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _tile(T, D, n_tiles, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's token positions t in its row, channels d, their mask, and the row's
        first flat index (int64)."""
        pid_d, pid_t = tl.program_id(0), tl.program_id(1)
        t = (pid_t % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        return t, d, d < D, (pid_t // n_tiles).to(tl.int64) * T

    @triton.jit
    def _conv_fwd_kernel(
        x, w, u, T, D, n_tiles,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        t, d, dmask, row0 = _tile(T, D, n_tiles, BLOCK_T, BLOCK_D)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in tl.static_range(K):
            src = t - j
            m = ((src >= 0) & (src < T))[:, None] & dmask[None, :]
            xv = tl.load(x + (row0 + src)[:, None] * D + d[None, :], mask=m, other=0.0)
            wj = tl.load(w + j * D + d, mask=dmask, other=0.0).to(tl.float32)
            acc += wj[None, :] * xv.to(tl.float32)
        out = (t < T)[:, None] & dmask[None, :]
        tl.store(u + (row0 + t)[:, None] * D + d[None, :], acc.to(u.dtype.element_ty), mask=out)

    @triton.jit
    def _conv_bwd_kernel(
        x, w, du, dx, dw_parts, T, D, n_tiles,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        t, d, dmask, row0 = _tile(T, D, n_tiles, BLOCK_T, BLOCK_D)
        parts = dw_parts + tl.program_id(1).to(tl.int64) * K * D  # this tile's dw partial sums
        tmask = t < T
        here = tmask[:, None] & dmask[None, :]
        du_t = tl.load(du + (row0 + t)[:, None] * D + d[None, :], mask=here, other=0.0)
        du_t = du_t.to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in tl.static_range(K):
            wj = tl.load(w + j * D + d, mask=dmask, other=0.0).to(tl.float32)
            # dx_t gets w_j du_{t+j}; dw_j gets du_t x_{t-j} over this tile's t
            ahead = t + j
            m = (ahead < T)[:, None] & dmask[None, :]
            dv = tl.load(du + (row0 + ahead)[:, None] * D + d[None, :], mask=m, other=0.0)
            acc += wj[None, :] * dv.to(tl.float32)
            back = t - j
            m = (tmask & (back >= 0))[:, None] & dmask[None, :]
            xv = tl.load(x + (row0 + back)[:, None] * D + d[None, :], mask=m, other=0.0)
            part = tl.sum(du_t * xv.to(tl.float32), axis=0)
            tl.store(parts + j * D + d, part, mask=dmask)
        tl.store(dx + (row0 + t)[:, None] * D + d[None, :], acc.to(dx.dtype.element_ty), mask=here)


def _grid(B: int, T: int, D: int) -> tuple[int, int]:
    return triton.cdiv(D, BLOCK_D), B * triton.cdiv(T, BLOCK_T)


def conv_forward_kernel(x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """u (B, T, D) in ``dtype`` by the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    x, w = x.contiguous(), w.contiguous()
    B, T, D = x.shape
    u = torch.empty((B, T, D), device=x.device, dtype=dtype)
    grid = _grid(B, T, D)
    _conv_fwd_kernel[grid](
        x, w, u, T, D, grid[1] // B,
        K=w.size(0), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )  # fmt: skip
    return u


def conv_backward_kernel(x: Tensor, w: Tensor, du: Tensor) -> tuple[Tensor, Tensor]:
    """(dx in x's dtype, dw (k, D) in w's dtype) by the Triton kernel."""
    x, w, du = x.contiguous(), w.contiguous(), du.contiguous()
    B, T, D = x.shape
    k = w.size(0)
    grid = _grid(B, T, D)
    dx = torch.empty_like(x)
    parts = torch.empty((grid[1], k, D), device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[grid](
        x, w, du, dx, parts, T, D, grid[1] // B,
        K=k, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )  # fmt: skip
    return dx, parts.sum(dim=0).to(w.dtype)


def _use_triton(t: Tensor) -> bool:
    return triton is not None and t.is_cuda


# ---------------------------------------------------------------- the op
@torch.library.custom_op("muongpt::causal_conv", mutates_args=())
def causal_conv(x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """u_t = Σ_{j<k} w_j ⊙ x_{t-j} for x (B, T, D), w (k, D), in ``dtype``."""
    if _use_triton(x):
        return conv_forward_kernel(x, w, dtype)
    return causal_conv_reference(x, w, dtype)


@causal_conv.register_fake
def _causal_conv_fake(x, w, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("muongpt::causal_conv_bwd", mutates_args=())
def causal_conv_bwd(x: Tensor, w: Tensor, du: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dw) of ``causal_conv``."""
    if _use_triton(x):
        return conv_backward_kernel(x, w, du)
    return causal_conv_backward_reference(x, w, du)


@causal_conv_bwd.register_fake
def _causal_conv_bwd_fake(x, w, du):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w)


def _backward(ctx, du):
    x, w = ctx.saved_tensors
    dx, dw = causal_conv_bwd(x, w, du)
    return dx, dw, None


causal_conv.register_autograd(_backward, setup_context=_setup_context)
