"""The symmetric products of a Newton-Schulz step, computed one triangle at a time (Triton).

A Newton-Schulz step (``muongpt.optim.newton_schulz``) on X (m, n), m <= n, is

    A = X X^T                 # (m, m), symmetric: 2 m^2 n flops
    B = b A + c A A^T         # (m, m), symmetric (A A^T = A^2): 2 m^3 flops
    X <- a X + B X            # (m, n): 2 m^2 n flops, a plain GEMM (cuBLAS baddbmm)

Both symmetric products are one kernel, ``out = alpha Y Y^T + beta C`` for a batch of Y (m, k)
and symmetric C (m, m): one program per (BLOCK x BLOCK) tile on or above the diagonal computes
it (fp32 accumulation, the epilogue adds beta C) and stores it twice, at (i, j) and transposed at
(j, i). At m = 768 that is 21 of the 36 128 x 128 tiles (about half, the diagonal counted once):
for the d12 hidden matrices (48 of 768 x 768, 24 of 768 x 3072 in the wide orientation) a 5-step
Polar Express step goes from 1.63 to 1.22 TFLOP. The output is exactly symmetric, where a general
GEMM's need not be bit-for-bit.

``symmetric_gram`` runs the kernel on CUDA (or under ``TRITON_INTERPRET=1`` on CPU tensors, for
tests) and the same math in PyTorch elsewhere; ``kernel_usable`` says whether the kernel runs.

``poly_times`` is the step's last product, a X + B X. cuBLAS's ``baddbmm`` (``PRODUCT =
"cublas"``, the default) first copies X into its output, a whole pass over the stack per step;
``PRODUCT = "triton"`` is a batched GEMM that reads a X in its epilogue instead. Alone it beat
``baddbmm`` (0.099 against 0.114 ms on 12 768 x 768 matrices, 128 x 256 x 64 tiles; one H200,
torch 2.11.0+cu130, 2026-12-04), but a whole Muon step ran slower with it (3.95 against 3.86 ms,
at 128 x 128 tiles), so cuBLAS stays the default (``benchmarks/newton_schulz_kernel.py`` and
``benchmarks/optimizer_step.py`` time both).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from muongpt.kernels.triton_support import (
    TensorDescriptor,
    failure_reason,
    interpreting,
    sm_count,
    tl,
    triton,
)

# (BLOCK, BLOCK_K, num_stages, num_warps): 128 x 128 output tiles, the usual Hopper bf16 shape.
LAUNCH = (128, 64, 4, 8)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# "pointer": one program per tile, pipelined plain loads (any GPU Triton runs on). "tma" (Hopper+):
# persistent, one program per SM looping over the tiles, operands and stores through TMA
# descriptors; used where m is a multiple of BLOCK (tiles never straddle two matrices of the
# flattened batch), else the pointer kernel runs.
KERNEL = "pointer"
KERNELS = ("pointer", "tma")
FAILED: dict[str, str] = {}  # kernel -> why it could not run here (then PyTorch computes it)
PRODUCT = "cublas"  # a X + B X: "cublas" (torch.baddbmm) or "triton" (_poly_times_kernel)
PRODUCTS = ("cublas", "triton")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of _poly_times_kernel: the fastest of
# newton_schulz_kernel.py's five at both d12 shapes
PRODUCT_LAUNCH = (128, 256, 64, 3, 8)


def kernel_usable(y: Tensor) -> bool:
    """The Triton kernel takes ``y``: Triton present, and a CUDA half-precision tensor (or any
    CPU tensor under the interpreter)."""
    if triton is None or KERNEL in FAILED:
        return False
    if y.is_cuda:
        return y.dtype in KERNEL_DTYPES
    return interpreting() and y.device.type == "cpu"


def symmetric_gram_torch(y: Tensor, c: Tensor | None = None, alpha=1.0, beta=0.0) -> Tensor:
    """alpha Y Y^T + beta C for a batch Y (b, m, k), in PyTorch (the kernel's reference)."""
    if c is None:
        return torch.bmm(y, y.mT) if alpha == 1.0 else torch.bmm(y, y.mT) * alpha
    return torch.baddbmm(c, y, y.mT, beta=beta, alpha=alpha)


if triton is not None:

    @triton.jit
    def _upper_tile(t):
        """The t-th tile (i, j), i <= j, counting the upper triangle column by column."""
        j = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)  # fp32 sqrt off by one
        j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
        return t - j * (j + 1) // 2, j

    @triton.jit
    def _symmetric_gram_kernel(
        y, c, out, M, K, stride_yb, stride_ym, stride_yk, alpha, beta,
        HAS_C: tl.constexpr, EVEN_K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,
    ):  # fmt: skip
        # Program (t, batch): tile (i, j), i <= j, of out[batch] = alpha Y Y^T + beta C, stored at
        # (i, j) and at (j, i). y (B, M, K) any strides; c and out (B, M, M) contiguous.
        pid_m, pid_n = _upper_tile(tl.program_id(0))
        batch = tl.program_id(1).to(tl.int64)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rn = pid_n * BLOCK + tl.arange(0, BLOCK)
        rk = tl.arange(0, BLOCK_K)
        # Rows past the edge wrap around: in-bounds reads whose results the stores mask off.
        ym = (rm % M).to(tl.int64)
        yn = (rn % M).to(tl.int64)
        base = y + batch * stride_yb
        a_ptrs = base + ym[:, None] * stride_ym + rk[None, :] * stride_yk
        b_ptrs = base + yn[:, None] * stride_ym + rk[None, :] * stride_yk
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K_TILES):
            if EVEN_K:
                a_tile = tl.load(a_ptrs)
                b_tile = tl.load(b_ptrs)
            else:
                k_in = rk[None, :] < K - k * BLOCK_K
                a_tile = tl.load(a_ptrs, mask=k_in, other=0.0)
                b_tile = tl.load(b_ptrs, mask=k_in, other=0.0)
            acc = tl.dot(a_tile, tl.trans(b_tile), acc)
            a_ptrs += BLOCK_K * stride_yk
            b_ptrs += BLOCK_K * stride_yk
        acc = acc * alpha
        first = batch * M * M
        offs = first + rm.to(tl.int64)[:, None] * M + rn[None, :]
        inside = (rm[:, None] < M) & (rn[None, :] < M)
        if HAS_C:
            acc += beta * tl.load(c + offs, mask=inside, other=0.0).to(tl.float32)
        res = acc.to(out.dtype.element_ty)
        tl.store(out + offs, res, mask=inside)
        if pid_m != pid_n:  # the mirror tile; a diagonal tile is its own mirror
            offs_t = first + rn.to(tl.int64)[:, None] * M + rm[None, :]
            inside_t = (rn[:, None] < M) & (rm[None, :] < M)
            tl.store(out + offs_t, tl.trans(res), mask=inside_t)

    @triton.jit
    def _symmetric_gram_tma_kernel(
        y_desc, c_desc, out_desc, M, K, alpha, beta,
        HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
        TILES: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    ):  # fmt: skip
        # Persistent: program p computes tiles p, p + NUM_PROGRAMS, ... of the upper triangles,
        # matrix by matrix (TILES of them in all). Descriptors: y (B * M, K), c and out
        # (B * M, M); M % BLOCK == 0. TMA zero-fills reads past K. The loop bound is a constant
        # (Triton's interpreter cannot range from a program id).
        side = M // BLOCK
        per_matrix = side * (side + 1) // 2
        for i in range(0, tl.cdiv(TILES, NUM_PROGRAMS)):
            tile = tl.program_id(0) + i * NUM_PROGRAMS
            if tile < TILES:
                batch = tile // per_matrix
                pid_m, pid_n = _upper_tile(tile % per_matrix)
                row_m = batch * M + pid_m * BLOCK
                row_n = batch * M + pid_n * BLOCK
                acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
                for kk in range(K_TILES):
                    a_tile = y_desc.load([row_m, kk * BLOCK_K])
                    b_tile = y_desc.load([row_n, kk * BLOCK_K])
                    acc = tl.dot(a_tile, tl.trans(b_tile), acc)
                acc = acc * alpha
                if HAS_C:
                    acc += beta * c_desc.load([row_m, pid_n * BLOCK]).to(tl.float32)
                res = acc.to(out_desc.dtype)
                out_desc.store([row_m, pid_n * BLOCK], res)
                if pid_m != pid_n:
                    out_desc.store([row_n, pid_m * BLOCK], tl.trans(res))

    @triton.jit
    def _poly_times_kernel(
        b, x, out, M, N, a, K_TILES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Program (tile, batch): a tile of out[batch] = B X + a X, B (M, M), X and out (M, N),
        # all contiguous; fp32 accumulation, a X added in the epilogue, one rounding.
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m = tl.program_id(0) // tiles_n
        pid_n = tl.program_id(0) % tiles_n
        batch = tl.program_id(1).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        bm = (rm % M).to(tl.int64)  # rows past the edge wrap: in bounds, masked at the store
        xn = (rn % N).to(tl.int64)
        b_ptrs = b + batch * M * M + bm[:, None] * M + rk[None, :]
        x_ptrs = x + batch * M * N + rk[:, None].to(tl.int64) * N + xn[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K_TILES):
            k_in = rk < M - k * BLOCK_K
            b_tile = tl.load(b_ptrs, mask=k_in[None, :], other=0.0)
            x_tile = tl.load(x_ptrs, mask=k_in[:, None], other=0.0)
            acc = tl.dot(b_tile, x_tile, acc)
            b_ptrs += BLOCK_K
            x_ptrs += BLOCK_K * N
        offs = batch * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
        inside = (rm[:, None] < M) & (rn[None, :] < N)
        acc += a * tl.load(x + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=inside)


def poly_times(b: Tensor, x: Tensor, a: float, product: str | None = None) -> Tensor:
    """a X + B X for a batch of B (b, m, m) and X (b, m, n): ``PRODUCT``'s way (``product``
    overrides it), PyTorch's where the Triton kernel cannot run."""
    product = product or PRODUCT
    if product == "cublas" or not kernel_usable(x) or "poly_times" in FAILED:
        return torch.baddbmm(x, b, x, beta=a, alpha=1.0)
    b, x = b.contiguous(), x.contiguous()
    batch, m, n = x.shape
    out = torch.empty_like(x)
    bm, bn, bk, stages, warps = PRODUCT_LAUNCH
    if interpreting():
        bm, bn, bk = 16, 16, 16
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), batch)
    try:
        _poly_times_kernel[grid](
            b, x, out, m, n, float(a), K_TILES=triton.cdiv(m, bk),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps,
        )  # fmt: skip
    except Exception as e:  # as in symmetric_gram: warn once, use PyTorch
        if not x.is_cuda:
            raise
        FAILED["poly_times"] = failure_reason(e)
        message = f"poly_times kernel failed ({FAILED['poly_times']}); using baddbmm"
        warnings.warn(message, stacklevel=2)
        return torch.baddbmm(x, b, x, beta=a, alpha=1.0)
    return out


def _tma_ok(y: Tensor, block: int) -> bool:
    """The TMA kernel takes y: Hopper+ (or the interpreter), m a multiple of the tile, y
    contiguous with 16-byte rows."""
    if TensorDescriptor is None:
        return False
    if y.is_cuda and torch.cuda.get_device_capability(y.device) < (9, 0):
        return False
    _, m, k = y.shape
    rows_ok = (k * y.element_size()) % 16 == 0 and (m * y.element_size()) % 16 == 0
    return m % block == 0 and rows_ok and y.is_contiguous()


def symmetric_gram(
    y: Tensor,
    c: Tensor | None = None,
    alpha=1.0,
    beta=0.0,
    launch: tuple | None = None,
    kernel: str | None = None,
) -> Tensor:
    """alpha Y Y^T + beta C for a batch Y (b, m, k) and symmetric C (b, m, m); Y's dtype.

    The Triton kernel where ``kernel_usable(y)``, else PyTorch. ``launch`` and ``kernel``
    override ``LAUNCH`` and ``KERNEL`` (benchmarks/newton_schulz_kernel.py times them)."""
    kernel = kernel or KERNEL
    if not kernel_usable(y) or kernel in FAILED:
        return symmetric_gram_torch(y, c, alpha, beta)
    out = torch.empty(y.size(0), y.size(1), y.size(1), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    c = c.contiguous() if c is not None else None
    try:
        return _launch(y, c, out, alpha, beta, launch or LAUNCH, kernel)
    except Exception as e:  # a GPU or Triton that cannot build it: warn once, use PyTorch
        if not y.is_cuda:
            raise
        FAILED[kernel] = failure_reason(e)
        warnings.warn(
            f"symmetric Gram kernel {kernel!r} failed ({FAILED[kernel]}); using torch.bmm",
            stacklevel=2,
        )
        return symmetric_gram_torch(y, c, alpha, beta)


def _launch(y, c, out, alpha, beta, launch: tuple, kernel: str) -> Tensor:
    batch, m, k = y.shape
    block, block_k, stages, warps = launch
    if interpreting():  # small tiles: the interpreter runs numpy per program
        block, block_k = 16, 16
    if kernel == "tma" and _tma_ok(y, block):
        y2, out2 = y.view(batch * m, k), out.view(batch * m, m)
        c2 = c.view(batch * m, m) if c is not None else out2
        programs = sm_count(y.device.index or 0) if y.is_cuda else 4
        _symmetric_gram_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(y2, [block, block_k]),
            TensorDescriptor.from_tensor(c2, [block, block]),
            TensorDescriptor.from_tensor(out2, [block, block]),
            m, k, float(alpha), float(beta),
            HAS_C=c is not None, BLOCK=block, BLOCK_K=block_k, K_TILES=triton.cdiv(k, block_k),
            TILES=batch * (m // block) * (m // block + 1) // 2, NUM_PROGRAMS=programs,
            num_stages=stages, num_warps=warps,
        )  # fmt: skip
        return out
    tiles = triton.cdiv(m, block)
    grid = (tiles * (tiles + 1) // 2, batch)
    _symmetric_gram_kernel[grid](
        y, c if c is not None else out, out, m, k, *y.stride(), float(alpha), float(beta),
        HAS_C=c is not None, EVEN_K=k % block_k == 0, BLOCK=block, BLOCK_K=block_k,
        K_TILES=triton.cdiv(k, block_k),
        num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out
