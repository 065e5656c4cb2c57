"""The FP8 lm_head fused with the soft-capped cross-entropy: one op from hidden states to the loss.

The plain path (``fp8.fp8_linear``, then soft-cap and ``F.cross_entropy``) keeps the bf16 logits
for the backward and reads them once for the loss and once more for its gradient. Here, for
x (T, D), W (V, D), targets (T,), the gradient is made in the forward pass:

    logits = (e4m3(x) @ e4m3(W)^T) dequantized, bf16        # torch._scaled_mm, as in fp8.py
    z      = cap(logits)                      # A tanh((l + C) / B), A sigmoid((l + C) / B) or l
    lse    = log sum_v exp(z_v)                             # kernel 1: one streaming pass per row
    loss   = mean over valid rows of (lse - z[target])
    G      = e5m2((softmax(z) - onehot(target)) * cap'(logits) * grad_scale / n_valid)   # kernel 2

With K targets per row (multi-token prediction: targets t+1 .. t+K, weights w_k) the loss is
sum_k w_k (lse - z[target_k]) and the softmax term of G has weight sum_k w_k: the same two passes.
The logits are freed there; only G (1 byte per logit, half the bf16 logits) waits for the backward:
dx = G W and dW = G^T x as two ``_scaled_mm`` calls, G^T made by the Triton transpose of fp8.py
(fp8 tensor cores reduce only along contiguous dims). Writing G^T from kernel 2 as well took
11.4-14.2 ms per 65,536 tokens on an H100 against 7.3 ms for kernel 2 plus the transpose
(docs/speedrun.md). The incoming gradient of the loss goes into the dequantization scale (grad_loss
/ grad_scale, a tensor: no host sync), so ``grad_scale`` means what it means in fp8.py: the
multiplier on the gradient of the mean loss. Capped logits are bounded above by A, so the softmax
needs no running maximum: exp(z - A) cannot overflow. Rows whose target is negative are ignored (as
``ignore_index=-1``). Used only while gradients are on (training); evaluation takes the plain path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muongpt.kernels.fp8 import E5M2_MAX, FP8Head, grad_input, grad_weight, quantized_linear
from muongpt.kernels.triton_support import tl, triton
from muongpt.model.attention import rms_norm

CAP_MODES = {"none": 0, "tanh": 1, "sigmoid": 2}


def cap_mode(cap_form: tuple[str, float, float, float]) -> tuple[int, float, float, float]:
    """(mode, A, B, C) of z = A f((l + C) / B) from a model soft-cap's ``kernel_form()``."""
    kind, a, b, c = cap_form
    return CAP_MODES[kind], float(a), float(b), float(c)


# ---------------------------------------------------------------- reference (PyTorch)
def capped(logits: Tensor, mode: int, a: float, b: float, c: float = 0.0) -> tuple[Tensor, Tensor]:
    """z = cap(logits) and dz/dlogits, fp32: the kernels' math, for tests and CPU."""
    x = logits.float() + c
    if mode == CAP_MODES["tanh"]:
        t = torch.tanh(x / b)
        return a * t, (a / b) * (1 - t * t)
    if mode == CAP_MODES["sigmoid"]:
        s = torch.sigmoid(x / b)
        return a * s, (a / b) * s * (1 - s)
    return x, torch.ones_like(x)


def target_columns(targets: Tensor, weights: Tensor | None, rows: int) -> tuple[Tensor, Tensor]:
    """(targets (rows, K), weights (K,) fp32): K targets per row with their loss weights, or,
    without ``weights``, one target per row of weight 1."""
    if weights is None:
        return targets.reshape(rows, 1), torch.ones(1, device=targets.device)
    return targets.reshape(rows, -1), weights.float()


def reference_loss_and_grad(
    logits: Tensor,
    targets: Tensor,
    mode: int,
    a: float,
    b: float,
    grad_scale: float,
    c: float = 0.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(mean loss, e5m2 G (T, V)) in PyTorch: what the two kernels compute. ``targets`` (T,) or
    (T, K) with ``weights`` (K,): K targets per row (multi-token prediction)."""
    targets, weights = target_columns(targets, weights, logits.size(0))
    z, dz = capped(logits, mode, a, b, c)
    valid = targets >= 0
    n_valid = valid[:, 0].sum().clamp(min=1)
    wv = weights * valid  # (T, K): each target's weight, 0 where ignored
    safe = targets.clamp(min=0)
    lse = torch.logsumexp(z, dim=-1)
    loss = (wv * (lse[:, None] - z.gather(1, safe))).sum() / n_valid
    d = torch.softmax(z, dim=-1) * wv.sum(1, keepdim=True)
    d.scatter_add_(1, safe, -wv)
    d = d * dz * (grad_scale / n_valid)
    return loss, d.clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)


# ---------------------------------------------------------------- kernels
# Both kernels are bound by the special-function unit (one exp or reciprocal per clock per SM
# quarter), not by memory, when written with IEEE-style division and exp: per 131,072 x 50,304
# logits on an H100, 6.4 ms (lse) and 8.8 ms (gradient) against a 4.2 / 7.0 ms floor for just
# moving the bytes. So: exp2 with the log2(e) folded into constants, 1/b passed in, the sigmoid
# as one ex2 + one rcp.approx (bit-equal e5m2 gradients), and in the log-sum-exp sum only, where
# 50K terms average its error out, sigmoid from one tanh.approx (|d lse| < 2e-5 measured).
if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _rcp(x):
        """1/x by rcp.approx (~1 ulp): one special-function op."""
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def _tanh_rough(x):
        """tanh.approx.f32 (max relative error ~2^-11): one special-function op."""
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def _sigmoid(u):
        return _rcp(1.0 + tl.math.exp2(-LOG2E * u))

    @triton.jit
    def _cap(x, MODE: tl.constexpr, A, INV_B, C):
        """(z, dz/dx) of the soft-cap, fp32. tanh(u) = 2 sigmoid(2u) - 1."""
        x = x + C
        if MODE == 1:
            t = 2.0 * _sigmoid(2.0 * x * INV_B) - 1.0
            return A * t, (A * INV_B) * (1.0 - t * t)
        elif MODE == 2:
            s = _sigmoid(x * INV_B)
            return A * s, (A * INV_B) * s * (1.0 - s)
        else:
            return x, x * 0.0 + 1.0

    @triton.jit
    def _cap_rough(x, MODE: tl.constexpr, A, INV_B, C):
        """The capped logit from tanh.approx (MODE 1 or 2): for the log-sum-exp sum only."""
        x = x + C
        if MODE == 1:
            return A * _tanh_rough(x * INV_B)
        else:
            return A * (0.5 + 0.5 * _tanh_rough(x * (0.5 * INV_B)))

    @triton.jit
    def _row_lse_kernel(
        logits, targets, weights, lse_out, loss_out, V, MODE: tl.constexpr, A, INV_B, C,
        K: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One row per program; int64 offsets (T x V has more than 2^31 entries).
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * V
        if MODE == 0:  # uncapped: a running maximum per lane
            m = tl.full([BLOCK], -1e30, tl.float32)
            s = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < V
                z = tl.load(base + cols, mask=inside, other=-1e30).to(tl.float32)
                m_new = tl.maximum(m, z)
                s = s * tl.math.exp2(LOG2E * (m - m_new))
                s += tl.where(inside, tl.math.exp2(LOG2E * (z - m_new)), 0.0)
                m = m_new
            top = tl.max(m, axis=0)
            lse = top + tl.log(tl.sum(s * tl.math.exp2(LOG2E * (m - top)), axis=0))
        else:  # capped: z <= A, so exp(z - A) <= 1
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < V
                x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                z = _cap_rough(x, MODE, A, INV_B, C)
                acc += tl.where(inside, tl.math.exp2(LOG2E * (z - A)), 0.0)
            lse = A + tl.log(tl.sum(acc, axis=0))
        loss = 0.0
        for k in tl.static_range(K):  # the row's K targets (K > 1: multi-token prediction)
            target = tl.load(targets + row * K + k)
            x_t = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
            z_t, _ = _cap(x_t, MODE, A, INV_B, C)  # the loss's own terms in full precision
            loss += tl.where(target >= 0, tl.load(weights + k) * (lse - z_t), 0.0)
        tl.store(lse_out + row, lse)
        tl.store(loss_out + row, loss)

    @triton.jit
    def _grad_kernel(
        logits, targets, weights, lse, scale, g_out, T, V, MODE: tl.constexpr, A, INV_B, C,
        K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    ):  # fmt: skip
        # One BT x BV tile of the gradient, in e5m2. The tile's base offset is int64 (T x V has
        # more than 2^31 entries); offsets inside it stay int32.
        r0, c0 = tl.program_id(0) * BT, tl.program_id(1) * BV
        r, c = tl.arange(0, BT), tl.arange(0, BV)
        in_rows, in_cols = r0 + r < T, c0 + c < V
        inside = in_rows[:, None] & in_cols[None, :]
        tile = r0.to(tl.int64) * V + c0 + (r[:, None] * V + c[None, :])
        x = tl.load(logits + tile, mask=inside, other=0.0)
        z, dz = _cap(x.to(tl.float32), MODE, A, INV_B, C)
        row_lse = tl.load(lse + r0 + r, mask=in_rows, other=0.0)
        p = tl.math.exp2(LOG2E * (z - row_lse[:, None]))
        # d loss / d z = (sum of the row's valid target weights) p - sum_k w_k onehot(target_k)
        total = tl.zeros([BT], tl.float32)
        hits = tl.zeros([BT, BV], tl.float32)
        for k in tl.static_range(K):
            target = tl.load(targets + (r0 + r) * K + k, mask=in_rows, other=-1).to(tl.int32)
            w = tl.where(target >= 0, tl.load(weights + k), 0.0)
            total += w
            hits += tl.where(c0 + c[None, :] == target[:, None], w[:, None], 0.0)
        d = (p * total[:, None] - hits) * dz * tl.load(scale)
        d = tl.minimum(tl.maximum(d, -57344.0), 57344.0)  # E5M2_MAX: no overflow to inf
        g = d.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        tl.store(g_out + tile, g, mask=inside)


# Launch shapes, the fastest of those benchmarks/fp8_loss_kernels.py compares (H100): the row
# kernel streams a row in blocks of LSE_BLOCK; the gradient kernel works on GRAD_TILE tiles.
LSE_BLOCK, LSE_WARPS = 2048, 4
GRAD_TILE, GRAD_WARPS = (16, 256), 4


def loss_and_grad(
    logits: Tensor,
    targets: Tensor,
    mode: int,
    a: float,
    b: float,
    grad_scale: float,
    c: float = 0.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(mean loss, G (T, V) e5m2) from bf16 logits (T, V): the two kernels. ``targets`` (T,) or
    (T, K) with ``weights`` (K,), as in ``reference_loss_and_grad``."""
    T, V = logits.shape
    logits = logits.contiguous()
    targets, weights = target_columns(targets, weights, T)
    targets, weights = targets.contiguous(), weights.contiguous()
    K = targets.size(1)
    lse = torch.empty(T, device=logits.device, dtype=torch.float32)
    losses = torch.empty_like(lse)
    _row_lse_kernel[(T,)](
        logits, targets, weights, lse, losses, V, mode, a, 1.0 / b, c, K=K, BLOCK=LSE_BLOCK,
        num_warps=LSE_WARPS,
    )  # fmt: skip
    n_valid = (targets[:, 0] >= 0).sum().clamp(min=1)
    scale = (grad_scale / n_valid).float()
    g = torch.empty((T, V), device=logits.device, dtype=torch.uint8)
    bt, bv = GRAD_TILE
    _grad_kernel[(triton.cdiv(T, bt), triton.cdiv(V, bv))](
        logits, targets, weights, lse, scale, g, T, V, mode, a, 1.0 / b, c, K=K, BT=bt, BV=bv,
        num_warps=GRAD_WARPS,
    )  # fmt: skip
    return losses.sum() / n_valid, g.view(torch.float8_e5m2)


# ---------------------------------------------------------------- the op
@torch.library.custom_op("muongpt::fp8_head_loss", mutates_args=())
def fp8_head_loss(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    weights: Tensor,
    x_scale: float,
    w_scale: float,
    grad_scale: float,
    cap_mode: int,
    cap_a: float,
    cap_b: float,
    cap_c: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Soft-capped cross-entropy of x (T, D) @ w (V, D)^T against targets (T, K), weighted by
    ``weights`` (K,), summed over K and averaged over the rows whose first target is valid ->
    (loss fp32 (), G e5m2 (T, V), x8 (T, D), w8 (V, D)); the last three are kept for the
    backward."""
    logits, x8, w8 = quantized_linear(x, w, x_scale, w_scale)
    loss, g = loss_and_grad(logits, targets, cap_mode, cap_a, cap_b, grad_scale, cap_c, weights)
    return loss, g, x8, w8


@fp8_head_loss.register_fake
def _fp8_head_loss_fake(x, w, targets, weights, x_scale, w_scale, grad_scale, *_cap):
    T, V = x.size(0), w.size(0)
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((T, V), dtype=torch.float8_e5m2),
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        w.new_empty(w.shape, dtype=torch.float8_e4m3fn),
    )


@torch.library.custom_op("muongpt::fp8_head_loss_backward", mutates_args=())
def fp8_head_loss_backward(
    grad_loss: Tensor,
    g: Tensor,
    x8: Tensor,
    w8: Tensor,
    x_scale: float,
    w_scale: float,
    grad_scale: float,
) -> tuple[Tensor, Tensor]:
    """dx = G W (bf16 (T, D)) and dW = G^T x (fp32 (V, D)), each times grad_loss (G holds
    grad_scale x the mean-loss gradient). G^T is made here (``grad_weight``'s Triton transpose),
    not in the forward: less memory held between the two passes."""
    dx = grad_input(g, w8, w_scale, grad_scale, times=grad_loss)
    dw = grad_weight(g, x8, x_scale, grad_scale, times=grad_loss)
    return dx, dw


@fp8_head_loss_backward.register_fake
def _fp8_head_loss_backward_fake(grad_loss, g, x8, w8, x_scale, w_scale, grad_scale):
    T, D, V = x8.size(0), x8.size(1), w8.size(0)
    return (
        g.new_empty((T, D), dtype=torch.bfloat16),
        g.new_empty((V, D), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, w, _targets, _weights, x_scale, w_scale, grad_scale, *_ = inputs
    _, g, x8, w8 = output
    ctx.save_for_backward(g, x8, w8)
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype


def _backward(ctx, grad_loss, *_unused):
    g, x8, w8 = ctx.saved_tensors
    dx, dw = fp8_head_loss_backward(grad_loss, g, x8, w8, *ctx.scales)
    return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), *[None] * 9


fp8_head_loss.register_autograd(_backward, setup_context=_setup_context)


def fp8_cross_entropy(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    scales: tuple[float, float, float],
    cap_form: tuple[str, float, float, float] = ("none", 1.0, 1.0, 0.0),
    weights: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of ``cap(x @ w.T)`` against ``targets`` (< 0: ignored), x (..., D),
    targets (...), or (..., K) with ``weights`` (K,) (multi-token prediction): the fused fp8 path
    (CUDA with Triton; token count a multiple of 16)."""
    x2 = x.reshape(-1, x.size(-1)).contiguous()
    targets, weights = target_columns(targets, weights, x2.size(0))
    cap = cap_mode(cap_form)
    return fp8_head_loss(x2, w.contiguous(), targets, weights, *scales, *cap)[0]


class FP8LossHead(FP8Head):
    """The FP8 head whose training forward (gradients on, fp8 usable) is the fused op above:
    matmul, soft-cap, loss and the e5m2 logit gradient; otherwise the FP8 head's plain path."""

    def forward(
        self, x: Tensor, targets: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        fused = targets is not None and torch.is_grad_enabled() and triton is not None
        if fused and self.fp8_usable(x):
            cap = self.cap.kernel_form()
            return fp8_cross_entropy(rms_norm(x), self.weight, targets, self.scales, cap, weights)
        return super().forward(x, targets, weights)
