"""FP8 MLP: the ReLU² MLP's up-projection forward and its down projection (forward and input
gradient) on the fp8 tensor cores, every operand scaled by its own current maximum.

For x (M, D), W1 = fc.weight (H, D), W2 = proj.weight (D, H), with a per-tensor scale taken on
the device from the tensor's largest entry (no host sync; e4m3 max 448, e5m2 max 57344),

    s(t, F) = F / max|t|,   q(t, F) = round_to_fp8(t * s(t, F))
    pre   = q(x, 448) q(W1, 448)^T / (s_x s_W1)               # e4m3 x e4m3 -> bf16
    post  = relu(pre)^2
    y     = q(post, 448) q(W2, 448)^T / (s_post s_W2)         # e4m3 x e4m3 -> bf16

and backward, the output gradient dy in e5m2 (more range, less precision):

    dpost = q(dy, 57344) q(W2, 448) / (s_dy s_W2)             # e5m2 x e4m3 -> bf16
    dpre  = dpost * 2 sqrt(post)                              # = dpost * 2 relu(pre)
    dW2   = dy^T post,  dW1 = dpre^T x,  dx = dpre W1         # bf16

Why these three matmuls: they are half of the MLP's six, the MLP is most of a d12 step's
FLOPs, and fp8 tensor cores run at twice the bf16 rate on Hopper. The weight gradients reduce
over every token of the step, where fp8's 3-bit (e4m3) or 2-bit (e5m2) mantissa would cost the
most, and they would need the (M, H) activations copied transposed (fp8 operands must be
contiguous along the reduced dim); dx would need a scale of the (M, H) dpre, one more pass over
it. So those stay bf16. Dynamic scales, unlike the head's fixed ones (``fp8.py``), follow each
layer's activations and gradients as they grow and shrink over a run; ``post`` has the heavy
tail of a square.

Only ``x``, ``post`` and the fp8 copy of W2 (with its scale) are kept for the backward, as the
fused ReLU² MLP keeps x and post. The ``torch.autograd.Function`` is plain PyTorch with
``torch._scaled_mm``, so ``torch.compile`` fuses each amax, scale and cast into the kernels
around it. Where fp8 is unavailable (CPU, GPUs before compute capability 8.9, features or token
counts not multiples of 16) ``FP8MLP`` is the plain MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from muongpt.kernels.fp8 import E4M3_MAX, E5M2_MAX, FP8Matmul, column_major, to_fp8
from muongpt.model.gpt import MLP


def amax_scale(t: Tensor, fp8_max: float) -> Tensor:
    """fp8_max / max|t| as a 0-dim fp32 tensor on t's device (an all-zero t gets a finite one).
    A true division: ``fp8_max / tensor`` is a reciprocal times fp8_max, an ulp off, which moves
    the many activations that land on fp8 rounding ties to the other side."""
    amax = t.abs().amax().float().clamp(min=1e-30)
    return amax.new_full((), fp8_max) / amax


def scaled_mm(a8: Tensor, b8: Tensor, a_scale: Tensor, b_scale: Tensor, fast: bool) -> Tensor:
    """(a8 @ b8) / (a_scale * b_scale) in bf16; a8 row-major, b8 column-major. ``_scaled_mm``
    takes dequantization scales, the inverses of ours."""
    return torch._scaled_mm(
        a8,
        b8,
        scale_a=a_scale.reciprocal(),
        scale_b=b_scale.reciprocal(),
        out_dtype=torch.bfloat16,
        use_fast_accum=fast,
    )


class FP8MLPFunction(torch.autograd.Function):
    """y = relu(x W1^T)^2 W2^T for 2-D x (M, D); the math is in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        e4m3 = torch.float8_e4m3fn
        s_x, s_w1, s_w2 = (amax_scale(t, E4M3_MAX) for t in (x, w1, w2))
        w1_8 = to_fp8(w1, s_w1, e4m3, E4M3_MAX)
        w2_8 = to_fp8(w2, s_w2, e4m3, E4M3_MAX)
        pre = scaled_mm(to_fp8(x, s_x, e4m3, E4M3_MAX), w1_8.t(), s_x, s_w1, fast=True)
        post = F.relu(pre).square()
        s_post = amax_scale(post, E4M3_MAX)
        y = scaled_mm(to_fp8(post, s_post, e4m3, E4M3_MAX), w2_8.t(), s_post, s_w2, fast=True)
        ctx.save_for_backward(x, post, w1, w2_8, s_w2)
        ctx.w_dtypes = (w1.dtype, w2.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, post, w1, w2_8, s_w2 = ctx.saved_tensors
        dy = dy.contiguous()  # the fp8 operand must be row-major
        s_dy = amax_scale(dy, E5M2_MAX)
        dy8 = to_fp8(dy, s_dy, torch.float8_e5m2, E5M2_MAX)
        dpost = scaled_mm(dy8, column_major(w2_8), s_dy, s_w2, fast=False)
        dpre = dpost * 2 * post.sqrt()
        dy16, x16, dpre16 = dy.to(torch.bfloat16), x.to(torch.bfloat16), dpre.to(torch.bfloat16)
        dw2 = dy16.t().mm(post.to(torch.bfloat16))
        dw1 = dpre16.t().mm(x16)
        dx = dpre16.mm(w1.to(torch.bfloat16))
        return dx.to(x.dtype), dw1.to(ctx.w_dtypes[0]), dw2.to(ctx.w_dtypes[1])


def fp8_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """The fp8 MLP for x (..., D); bf16 output (..., D)."""
    lead = x.shape[:-1]
    y = FP8MLPFunction.apply(x.reshape(-1, x.size(-1)).contiguous(), w1, w2)
    return y.view(*lead, w2.size(0))


class FP8MLP(FP8Matmul, MLP):
    """The model's MLP with the fp8 matmuls above where the device and shapes take them,
    elsewhere the plain MLP. Built by the ``fp8_mlp`` converter around the same Parameters."""

    def __init__(self, mlp: MLP):
        torch.nn.Module.__init__(self)
        self.fc, self.proj = mlp.fc, mlp.proj
        hidden, dim = self.fc.weight.shape
        self.decide_fp8(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_usable(x):
            return fp8_mlp(x, self.fc.weight, self.proj.weight)
        return super().forward(x)
