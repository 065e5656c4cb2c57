"""FP8 lm_head: ``y = x W^T`` on the fp8 tensor-core path (Hopper, Ada: compute capability 8.9+).

Forward, e4m3 operands, bf16 output:

    x8 = e4m3(x * x_scale)      W8 = e4m3(W * w_scale)
    y  = (x8 @ W8^T) / (x_scale * w_scale)            # torch._scaled_mm, fast accumulation

Backward, the output gradient g in e5m2 (wider range, less precision):

    g8 = e5m2(g * grad_scale)
    dx = (g8 @ W8) / (grad_scale * w_scale)           # bf16
    dW = (g8^T @ x8) / (grad_scale * x_scale)         # fp32; fp8_dw=True (default: bf16 g^T x)

The scales are *quantization* multipliers; ``torch._scaled_mm`` takes *dequantization* scales
(it computes (a * scale_a) @ (b * scale_b)), so it is given their inverses. Values past the fp8
range are clamped (e4m3fn has no infinity: an overflowing cast would give NaN). The seed scales
(input x2, weight x32, gradient x2^29, modded-nanogpt Jan 2025) suit a post-RMSNorm input
(entries ~1), a head weight of ~0.01-0.1 and the gradient of a mean loss over ~10^5 tokens.

The fp8 matmuls are ``torch.library`` custom ops with fake kernels (shapes, dtypes and contiguous
strides exactly as the real kernels return them), so ``torch.compile`` treats them as opaque
nodes. fp8 tensor cores take only operands contiguous along the reduced dimension, so the fp8 dW
(reduced over tokens) needs the e5m2 gradient transposed: a tiled Triton kernel writes that copy
(one read and one write of a 1-byte tensor); without Triton it is a PyTorch copy. The gradient's
scale-and-cast sits in the traced backward formula, where the compiler fuses it into the kernel
that produced the gradient. Where fp8 is unavailable (CPU, GPUs before
compute capability 8.9, shapes not multiples of 16) ``FP8Linear`` is a plain (bf16 under
autocast) ``nn.Linear``, and says so once in the log.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt.kernels.triton_support import tl, triton
from muongpt.model.gpt import Head

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
DEFAULT_SCALES = (2.0, 32.0, 2.0**29)  # input, weight, gradient


def fp8_available(device: torch.device | str | None = None) -> bool:
    """True when ``device`` (default: the current CUDA device) can run fp8 ``_scaled_mm``."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _dequantized_mm(
    a8: Tensor,
    b8: Tensor,
    a_scale: float,
    b_scale: float,
    out_dtype: torch.dtype,
    fast_accum: bool,
    times: Tensor | None = None,
) -> Tensor:
    """(a8 @ b8) / (a_scale * b_scale) [* times]: a8 row-major, b8 column-major, as ``_scaled_mm``
    wants. It takes dequantization scales, the inverses of ours, as 0-dim fp32 tensors: made by
    a fill kernel, not torch.tensor(..., device=cuda), so no host-to-device copy and no sync.
    ``times`` (0-dim, on the device) is folded into a8's scale, e.g. an incoming loss gradient."""

    def inverse(scale: float) -> Tensor:
        return torch.full((), 1.0 / scale, device=a8.device, dtype=torch.float32)

    return torch._scaled_mm(
        a8,
        b8,
        scale_a=inverse(a_scale) if times is None else times.float() / a_scale,
        scale_b=inverse(b_scale),
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


def column_major(t: Tensor) -> Tensor:
    """The same 2-D matrix laid out column-major (contiguous along its first dim)."""
    return t.t().contiguous().t()


def to_fp8(t: Tensor, scale: float | Tensor, dtype: torch.dtype, limit: float) -> Tensor:
    """round_to_fp8(t * scale), clamped to the format's range (e4m3fn has no infinity)."""
    return (t.float() * scale).clamp(-limit, limit).to(dtype)


def quantized_linear(
    x: Tensor, w: Tensor, x_scale: float, w_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(x @ w^T in fp8, dequantized bf16 (M, N), x8 (M, K), w8 (N, K)): the forward of the fp8
    head, shared by ``fp8_matmul`` and the fused loss (fp8_loss.py)."""
    x8 = to_fp8(x, x_scale, torch.float8_e4m3fn, E4M3_MAX)  # x (M, K): M tokens
    w8 = to_fp8(w, w_scale, torch.float8_e4m3fn, E4M3_MAX)
    # w8.t(): (K, N) column-major
    y = _dequantized_mm(x8, w8.t(), x_scale, w_scale, torch.bfloat16, fast_accum=True)
    return y, x8, w8


def grad_input(
    g8: Tensor, w8: Tensor, w_scale: float, grad_scale: float, times: Tensor | None = None
) -> Tensor:
    """dx = g8 (M, N) e5m2 @ w8 (N, K) e4m3, dequantized [times ``times``]: bf16 (M, K)."""
    # w8 (N, K) column-major: contiguous along the reduced N
    return _dequantized_mm(
        g8, column_major(w8), grad_scale, w_scale, torch.bfloat16, fast_accum=False, times=times
    )


def grad_weight(
    g8: Tensor, x8: Tensor, x_scale: float, grad_scale: float, times: Tensor | None = None
) -> Tensor:
    """dW = g8^T (N, M) @ x8 (M, K), dequantized [times ``times``], fp32 (N, K). Both operands
    are made contiguous along the reduced M (tokens): the gradient by ``transpose_fp8``, x8
    (small) by a plain copy."""
    return _dequantized_mm(
        transpose_fp8(g8), column_major(x8), grad_scale, x_scale, torch.float32,
        fast_accum=False, times=times,
    )  # fmt: skip


@torch.library.custom_op("muongpt::fp8_matmul", mutates_args=())
def fp8_matmul(
    x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float, fp8_dw: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) @ w (N, K)^T -> (y bf16 (M, N), x8, w8); x8 and w8 are kept for the backward,
    which computes dW in fp8 when ``fp8_dw`` (else in bf16)."""
    return quantized_linear(x, w, x_scale, w_scale)


@fp8_matmul.register_fake
def _fp8_matmul_fake(x, w, x_scale, w_scale, grad_scale, fp8_dw):
    M, N = x.size(0), w.size(0)
    return (
        x.new_empty((M, N), dtype=torch.bfloat16),
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        w.new_empty(w.shape, dtype=torch.float8_e4m3fn),
    )


@torch.library.custom_op("muongpt::fp8_matmul_backward", mutates_args=())
def fp8_matmul_backward(g8: Tensor, w8: Tensor, w_scale: float, grad_scale: float) -> Tensor:
    """dx = g8 (M, N) e5m2 @ w8 (N, K) e4m3, dequantized: bf16 (M, K), contiguous."""
    return grad_input(g8, w8, w_scale, grad_scale)


@fp8_matmul_backward.register_fake
def _fp8_matmul_backward_fake(g8, w8, w_scale, grad_scale):
    return g8.new_empty((g8.size(0), w8.size(1)), dtype=torch.bfloat16)


if triton is not None:

    @triton.jit
    def _transpose_bytes_kernel(src, dst, M, N, BM: tl.constexpr, BN: tl.constexpr):
        # One BM x BN tile per program: coalesced reads along src rows, coalesced writes along
        # dst rows (the tile is transposed in registers/shared memory). int64 offsets: a
        # (tokens x vocab) gradient has more than 2^31 entries.
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        tile = tl.load(src + rows[:, None] * N + cols[None, :], mask=inside)
        tl.store(dst + cols[:, None] * M + rows[None, :], tl.trans(tile), mask=tl.trans(inside))


# 64 x 128-byte tiles, 4 warps: 4.75 ms for 131,072 x 50,304 bytes on an H100 (2.8 TB/s moved),
# against 5.74 ms for 64 x 64 (H100, torch 2.11; docs/speedrun.md).
TRANSPOSE_TILE, TRANSPOSE_WARPS = (64, 128), 4


def transpose_fp8(t: Tensor) -> Tensor:
    """A contiguous copy of the 2-D fp8 tensor ``t`` transposed (Triton on CUDA, else PyTorch)."""
    M, N = t.shape
    if triton is None or not t.is_cuda:
        return t.t().contiguous()
    src = t.contiguous().view(torch.uint8)  # the kernel moves bytes; fp8 dtypes stay out of it
    dst = torch.empty((N, M), dtype=torch.uint8, device=t.device)
    bm, bn = TRANSPOSE_TILE
    _transpose_bytes_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        src, dst, M, N, bm, bn, num_warps=TRANSPOSE_WARPS
    )
    return dst.view(t.dtype)


@torch.library.custom_op("muongpt::fp8_grad_weight", mutates_args=())
def fp8_grad_weight(g8: Tensor, x8: Tensor, x_scale: float, grad_scale: float) -> Tensor:
    """dW = g8^T (N, M) @ x8 (M, K), dequantized, fp32 (N, K) (see ``grad_weight``)."""
    return grad_weight(g8, x8, x_scale, grad_scale)


@fp8_grad_weight.register_fake
def _fp8_grad_weight_fake(g8, x8, x_scale, grad_scale):
    return g8.new_empty((g8.size(1), x8.size(1)), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w, x_scale, w_scale, grad_scale, fp8_dw = inputs
    _, x8, w8 = output
    ctx.save_for_backward(None if fp8_dw else x, x8, w8)  # the fp8 dW needs x8 only
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.fp8_dw = fp8_dw
    ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype


def _backward(ctx, grad_y, _grad_x8, _grad_w8):
    x, x8, w8 = ctx.saved_tensors
    x_scale, w_scale, grad_scale = ctx.scales
    # Traced: under torch.compile the scaled cast fuses into the kernel that made grad_y.
    g8 = to_fp8(grad_y, grad_scale, torch.float8_e5m2, E5M2_MAX).contiguous()
    dx = fp8_matmul_backward(g8, w8, w_scale, grad_scale).to(ctx.x_dtype)
    if ctx.fp8_dw:
        dw = fp8_grad_weight(g8, x8, x_scale, grad_scale)
    else:  # bf16 g^T x, as under autocast
        dw = grad_y.to(torch.bfloat16).t().mm(x.to(torch.bfloat16))
    return dx, dw.to(ctx.w_dtype), None, None, None, None


fp8_matmul.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(
    x: Tensor,
    w: Tensor,
    scales: tuple[float, float, float] = DEFAULT_SCALES,
    fp8_dw: bool = False,
) -> Tensor:
    """``x @ w.T`` in fp8 for x (..., K), w (N, K); bf16 output (..., N). ``fp8_dw``: the
    weight gradient in fp8 too (else bf16)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.size(-1)).contiguous()
    y = fp8_matmul(x2, w.contiguous(), *scales, fp8_dw)[0]
    return y.view(*lead, w.size(0))


_fallback_logged = False


def _log_fallback(reason: str) -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("fp8: %s; using the bf16/regular matmul instead", reason)


def fp8_unavailable_reason(in_features: int, out_features: int) -> str | None:
    """Why a (in, out) matmul cannot run in fp8 on this machine, or None when it can. Decided
    once, at construction: a capability query inside a compiled forward would break the graph."""
    if in_features % 16 or out_features % 16:
        return f"features {in_features}x{out_features} not multiples of 16"
    if not fp8_available():
        return "no FP8-capable GPU (CPU, or CUDA compute capability < 8.9)"
    return None


def check_scales(scales) -> tuple[float, float, float]:
    if len(scales) != 3 or any(not s > 0 for s in scales):
        from muongpt import MuonGPTError

        raise MuonGPTError(f"kernels.fp8_scales must be 3 positive numbers, got {list(scales)}")
    return tuple(float(s) for s in scales)


class FP8Matmul:
    """What the fp8 modules share: their quantization scales, whether this machine and shape
    take the fp8 path (decided once, at construction), and the per-input check."""

    def init_fp8(self, in_features: int, out_features: int, scales) -> None:
        self.scales = check_scales(scales)
        self.decide_fp8(in_features, out_features)

    def decide_fp8(self, in_features: int, out_features: int) -> None:
        """``fp8_ok``: whether this machine and shape take the fp8 path (logged once if not)."""
        reason = fp8_unavailable_reason(in_features, out_features)
        self.fp8_ok = reason is None
        if reason:
            _log_fallback(reason)

    def fp8_usable(self, x: Tensor) -> bool:
        """The fp8 path takes ``x``: an fp8 GPU, x on it, a token count that is a multiple of 16."""
        rows = x.numel() // max(x.size(-1), 1)
        return self.fp8_ok and x.is_cuda and rows % 16 == 0


class FP8Linear(FP8Matmul, nn.Linear):
    """A bias-free ``nn.Linear`` whose matmul runs in fp8 where the device supports it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scales: tuple[float, float, float] = DEFAULT_SCALES,
        fp8_dw: bool = False,
    ):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_dw = fp8_dw
        self.init_fp8(in_features, out_features, scales)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_usable(x):
            return fp8_linear(x, self.weight, self.scales, self.fp8_dw)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, fp8={self.fp8_ok}, scales={self.scales}, fp8_dw={self.fp8_dw}"
        )


class FP8Head(FP8Matmul, Head):
    """The model's ``Head`` with its matmul in fp8, the weight gradient in fp8 too (measured
    faster at equal loss: 243.3 vs 247.5 ms/step, val 4.036 vs 4.037 on an H200). Built by the
    ``fp8_head`` converter around the same weight Parameter."""

    def __init__(self, head: Head, scales: tuple[float, float, float] = DEFAULT_SCALES):
        with torch.device("meta"):  # no second weight: the converted head's is reused
            super().__init__(head.in_features, head.out_features, head.vocab_size, head.cap)
        self.weight = head.weight
        self.init_fp8(head.in_features, head.out_features, scales)

    def project(self, x: Tensor) -> Tensor:
        if self.fp8_usable(x):
            return fp8_linear(x, self.weight, self.scales, fp8_dw=True)
        return F.linear(x, self.weight)
