"""AdamW's step over one large tensor in one Triton kernel (CUDA).

For a parameter p with gradient g, moments m and v, at step t (1-based), lr, betas (b1, b2), eps
and decoupled weight decay wd, every element is read once and written once, in fp32 whatever the
tensors' dtypes, and rounded once to each tensor's own dtype:

    p <- p (1 - lr wd)
    m <- m + (1 - b1) (g - m)                        # b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

the math of torch's fused AdamW. Why a kernel of its own: the speed run's side groups hold 348M
parameters (the bf16 value-embedding and bigram tables, the fp32 embedding/head), and torch's
fused step moves their 5.4 GB in 15 ``multi_tensor_apply`` launches at about 2.1 TB/s on an H100
(2.6 ms, 2026-12-05 profile, torch 2.11), where the bytes alone need 1.6 ms. One launch per tensor
with a program per BLOCK elements keeps more bytes in flight: 1.81 ms against fused AdamW's
2.31 ms over those tensors (H100, torch 2.11, Triton 3.6, 2026-12-05; ``benchmarks/
optimizer_step.py --only "speedrun tables"``). The bias corrections are host floats
(the step count lives on the host), so nothing is read back from the device.

``adamw_step_`` runs the kernel on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``, for
tests) and ``adamw_step_torch``, the same math in PyTorch, elsewhere or where the kernel fails to
build (warned once).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from muongpt.kernels.triton_support import failure_reason, tl, triton, triton_runs_on

BLOCK, WARPS = 4096, 8  # elements per program: 16-byte loads, several in flight per thread
FAILED: list[str] = []  # why the kernel could not run here (then PyTorch computes it)


def kernel_usable(*tensors: Tensor) -> bool:
    """Triton present and working; contiguous floating tensors of one size on one CUDA device
    (or CPU under the interpreter)."""
    first = tensors[0]
    if FAILED or not triton_runs_on(first):
        return False
    return all(
        t.is_floating_point()
        and t.is_contiguous()
        and t.device == first.device
        and t.numel() == first.numel()
        for t in tensors
    )


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(1 - beta1^t, sqrt(1 - beta2^t)) at step t."""
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def adamw_step_torch(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr, beta1, beta2, eps, weight_decay, step: int
) -> None:
    """The kernel's math in PyTorch, fp32 throughout, each tensor written once in its dtype."""
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2)
    g32, m32, v32 = g.float(), m.float(), v.float()
    m32 = m32 + (1 - beta1) * (g32 - m32)
    v32 = beta2 * v32 + (1 - beta2) * g32 * g32
    p32 = p.float() * (1 - lr * weight_decay)
    p32 = p32 - (lr / bc1) * m32 / (v32.sqrt() / bc2_sqrt + eps)
    m.copy_(m32)
    v.copy_(v32)
    p.copy_(p32)


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, n, decay, one_minus_b1, b2, one_minus_b2, step_size,
        inv_bc2_sqrt, eps, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        p = tl.load(p_ptr + offs, mask=inside).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=inside).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inside).to(tl.float32)
        m = m + one_minus_b1 * (g - m)
        v = b2 * v + one_minus_b2 * g * g
        p = p * decay - step_size * m / (tl.sqrt(v) * inv_bc2_sqrt + eps)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=inside)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=inside)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=inside)


def adamw_step_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr, beta1, beta2, eps, weight_decay, step: int
) -> None:
    """One AdamW step of ``p`` in place (``m``, ``v`` updated), ``step`` counting this one."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    if not kernel_usable(p, g, m, v):
        adamw_step_torch(p, g, m, v, **hyper)
        return
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2)
    n = p.numel()
    try:
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](
            p, g, m, v, n, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bc1,
            1 / bc2_sqrt, eps, BLOCK=BLOCK, num_warps=WARPS,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - any build or launch failure: PyTorch does it
        FAILED.append(failure_reason(error))
        warnings.warn(f"AdamW kernel unavailable ({FAILED[0]}); using PyTorch", stacklevel=2)
        adamw_step_torch(p, g, m, v, **hyper)
