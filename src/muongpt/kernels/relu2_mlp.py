"""The ReLU² MLP with the activation fused into GEMM epilogues (Triton): y = relu(x W1^T)^2 W2^T.

For x (M, D) bf16, W1 = fc.weight (H, D), W2 = proj.weight (D, H), the forward is

    post = relu(x @ W1^T)^2          # kernel 1: one Triton GEMM, ReLU² on the fp32 accumulator
    y    = post @ W2^T               # torch.mm (cuBLAS)

and only x, W1, W2 and post are kept for the backward. Since post = relu(pre)^2, the derivative
2 relu(pre) is 2 sqrt(post), so the pre-activation is never stored:

    dW2  = dy^T @ post               # torch.mm
    dpre = (dy @ W2) * 2 sqrt(post)  # kernel 2: the same GEMM (K = D), epilogue reads post
    dW1  = dpre^T @ x                # torch.mm
    dx   = dpre @ W1                 # torch.mm

sqrt of a bf16 square is as accurate as bf16 pre itself (more, in fact): post, rounded once from
the fp32 accumulator, is within 2^-8 (relative) of relu(pre)^2, so sqrt(post) is within 2^-9 of
relu(pre), where a bf16 pre is within 2^-8.

Why: the plain ``proj(relu(fc(x)).square())`` runs the ReLU² as memory-bound pointwise kernels
between the cuBLAS matmuls. At M = 131,072 tokens and H = 3072 each (M, H) bf16 tensor is 805 MB.
The forward here no longer writes ``pre`` and reads it back (1.6 GB per layer); the backward no
longer writes ``grad_post`` = dy W2 and reads it back (1.6 GB), and kernel 2's read of ``post``
takes the place of the pointwise kernel's read of ``pre`` (and, where the compiler kept only pre
for the backward, of recomputing post from it: 1.6 GB more). That is 3.2-4.8 GB per layer, about
1.1-1.7 ms at H100 bandwidth, in line with the ~16 ms per 12-layer step the profile shows.

Both Triton kernels are one GEMM, out (M, N) = epilogue(A (M, K) @ B (K, N)) with N = H, K = D,
chosen by a constexpr: ``EPILOGUE = 0`` stores relu(acc)^2, ``EPILOGUE = 1`` stores
acc * 2 sqrt(post). B is W1^T (``B_KMAJOR``: W1 is (N, K), contiguous along K) in the forward and
W2 (K, N) in the backward. Two implementations of that GEMM, chosen by ``KERNEL``:

- ``"pointer"``: one program per output tile, tiles in grouped order (GROUP_M row blocks sweep the
  columns together, for L2 reuse), software-pipelined plain loads. Works from Ampere on.
- ``"tma"`` (Hopper+, Triton >= 3.4): persistent, one program per SM looping over the tiles, the
  operands loaded and the output stored through host-side TMA tensor descriptors
  (``triton.tools.tensor_descriptor.TensorDescriptor``: no device allocator needed). Elsewhere,
  or if the tensors are not 16-byte aligned, the pointer kernel runs instead.

Launch shapes are ``FWD_CONFIG`` and ``BWD_CONFIG``; benchmarks/relu2_mlp.py times others. The op is ``torch.library`` custom ops with fake kernels
(contiguous outputs, exactly as the real ones), so ``torch.compile`` treats the kernels as opaque
nodes; the backward formula is traced (its matmuls are ordinary aten.mm). Without Triton or CUDA
the ops compute the same math in PyTorch (fp32 accumulation, one rounding), so CPU tests exercise
the op wiring. ``fused_mlp_usable`` says when callers should take the fused path.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt.kernels.triton_support import TensorDescriptor, sm_count, tl, triton
from muongpt.model.attention import matmul_dtype
from muongpt.model.gpt import MLP


class GemmConfig(NamedTuple):
    """A launch shape of the fused GEMM."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int  # row blocks per group of the tile order
    num_stages: int  # software-pipeline depth of the K loop
    num_warps: int
    epi_split: int = 1  # "tma": store the tile in this many column slices (1 or 2)
    per_sm: int = 1  # "tma": persistent programs per SM


# The fastest launch shape of benchmarks/relu2_mlp.py (which times the alternatives) on an H100
# (torch 2.11, Triton 3.6), M = 131,072: the tma kernel at 128x256x64, 3 stages, 8 warps takes
# 0.96 ms forward / 1.22 ms backward, against 1.38 / 1.66 ms for the compiled mm + pointwise.
FWD_CONFIG = GemmConfig(128, 256, 64, 8, 3, 8)  # post = relu(x W1^T)^2
BWD_CONFIG = GemmConfig(128, 256, 64, 8, 3, 8)  # dpre = (dy W2) * 2 sqrt(post); also loads post
KERNEL = "tma"  # or "pointer" (the tma kernel falls back to it before Hopper)
KERNELS = ("pointer", "tma")


# ---------------------------------------------------------------- reference (PyTorch)
def reference_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """proj(relu(fc(x))^2): the plain MLP, for tests."""
    return F.linear(F.relu(F.linear(x, w1)).square(), w2)


def relu2(pre: Tensor) -> Tensor:
    """post = relu(pre)^2: kernel 1's epilogue."""
    return F.relu(pre).square()


def relu2_grad(grad_post: Tensor, post: Tensor) -> Tensor:
    """dpre = grad_post * 2 sqrt(post) (= grad_post * 2 relu(pre)): kernel 2's epilogue."""
    return grad_post * (2.0 * post.sqrt())


def _fc_relu2_torch(x: Tensor, w1: Tensor) -> Tensor:
    return relu2(F.linear(x.float(), w1.float())).to(x.dtype)


def _grad_pre_torch(dy: Tensor, w2: Tensor, post: Tensor) -> Tensor:
    return relu2_grad(dy.float() @ w2.float(), post.float()).to(dy.dtype)


# ---------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of the tile-th output tile in grouped order: GROUP_M row
        blocks walk the column blocks together, so their A rows and B columns stay in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows_here = tl.minimum(num_m - first_m, GROUP_M)
        in_group = tile % per_group
        return first_m + in_group % rows_here, in_group // rows_here

    @triton.jit
    def _epilogue(acc, post, EPILOGUE: tl.constexpr):
        """fp32 accumulator -> stored value: relu(acc)^2, or acc * 2 sqrt(post)."""
        if EPILOGUE == 0:
            r = tl.maximum(acc, 0.0)
            return r * r
        else:
            return acc * (2.0 * tl.sqrt(post.to(tl.float32)))

    @triton.jit
    def _relu2_gemm_kernel(
        a, b, out, post, M, N, K, stride_a, stride_b,
        EPILOGUE: tl.constexpr, B_KMAJOR: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # One BLOCK_M x BLOCK_N tile of out = epilogue(a @ B) per program. a (M, K) row-major;
        # B = b^T with b (N, K) row-major if B_KMAJOR, else b (K, N) row-major; out and post
        # (M, N) contiguous.
        pid_m, pid_n = _tile_coords(
            tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M
        )
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # Rows and columns past the edge wrap around: in-bounds reads whose results the store
        # masks off, so the K loop needs no row/column masks. (With N a multiple of 16, `% N`
        # keeps runs of 16 contiguous columns: vector loads stay vector loads.) int64 offsets.
        am = (rm % M).to(tl.int64)
        bn = (rn % N).to(tl.int64)
        a_ptrs = a + (am[:, None] * stride_a + rk[None, :])
        if B_KMAJOR:
            b_ptrs = b + (bn[:, None] * stride_b + rk[None, :])  # (BLOCK_N, BLOCK_K)
        else:
            b_ptrs = b + (rk[:, None].to(tl.int64) * stride_b + bn[None, :])  # (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a_tile = tl.load(a_ptrs)
                b_tile = tl.load(b_ptrs)
            else:
                k_in = rk < K - k * BLOCK_K
                a_tile = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
                if B_KMAJOR:
                    b_tile = tl.load(b_ptrs, mask=k_in[None, :], other=0.0)
                else:
                    b_tile = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
            if B_KMAJOR:
                acc = tl.dot(a_tile, tl.trans(b_tile), acc)
                b_ptrs += BLOCK_K
            else:
                acc = tl.dot(a_tile, b_tile, acc)
                b_ptrs += BLOCK_K * stride_b
            a_ptrs += BLOCK_K
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        inside = (rm[:, None] < M) & (rn[None, :] < N)
        if EPILOGUE == 0:
            res = _epilogue(acc, acc, EPILOGUE)
        else:
            res = _epilogue(acc, tl.load(post + offs, mask=inside, other=0.0), EPILOGUE)
        tl.store(out + offs, res.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _relu2_gemm_tma_kernel(
        a_desc, b_desc, out_desc, post_desc, M, N, K,
        EPILOGUE: tl.constexpr, B_KMAJOR: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    ):  # fmt: skip
        # Persistent: program p computes tiles p, p + NUM_PROGRAMS, ... Descriptors: a (M, K),
        # b (N, K) if B_KMAJOR else (K, N), out and post (M, N) with column blocks of
        # BLOCK_N / EPI_SPLIT. TMA zero-fills reads past the edges and clips the stores.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_steps = tl.cdiv(K, BLOCK_K)
        first = tl.program_id(0)
        # The epilogue counts its tiles with a counter of its own (same values): nothing computed
        # for the loads is live across the K loop into the epilogue.
        done = first - NUM_PROGRAMS
        for tile in tl.range(first, num_m * num_n, NUM_PROGRAMS):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in range(k_steps):
                off_k = kk * BLOCK_K
                a_tile = a_desc.load([off_m, off_k])
                if B_KMAJOR:
                    acc = tl.dot(a_tile, tl.trans(b_desc.load([off_n, off_k])), acc)
                else:
                    acc = tl.dot(a_tile, b_desc.load([off_k, off_n]), acc)
            done += NUM_PROGRAMS
            pid_m, pid_n = _tile_coords(done, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            dtype = out_desc.dtype
            if EPI_SPLIT == 2:  # two (BLOCK_M, BLOCK_N / 2) halves: half the staging memory
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                left, right = tl.split(halves)
                if EPILOGUE == 0:
                    left = _epilogue(left, left, EPILOGUE)
                    right = _epilogue(right, right, EPILOGUE)
                else:
                    left = _epilogue(left, post_desc.load([off_m, off_n]), EPILOGUE)
                    right = _epilogue(
                        right, post_desc.load([off_m, off_n + BLOCK_N // 2]), EPILOGUE
                    )
                out_desc.store([off_m, off_n], left.to(dtype))
                out_desc.store([off_m, off_n + BLOCK_N // 2], right.to(dtype))
            else:
                if EPILOGUE == 0:
                    res = _epilogue(acc, acc, EPILOGUE)
                else:
                    res = _epilogue(acc, post_desc.load([off_m, off_n]), EPILOGUE)
                out_desc.store([off_m, off_n], res.to(dtype))


@cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_ok(*tensors: Tensor) -> bool:
    """The TMA kernel can take these (2-D, contiguous) tensors: Hopper+ (or the interpreter),
    16-byte aligned bases and row strides."""
    if TensorDescriptor is None:
        return False
    t = tensors[0]
    if t.is_cuda and _capability(t.device.index or 0) < (9, 0):
        return False
    return all(
        u.data_ptr() % 16 == 0 and (u.stride(0) * u.element_size()) % 16 == 0 for u in tensors
    )


def _gemm(
    a: Tensor,
    b: Tensor,
    post: Tensor | None,
    epilogue: int,
    b_kmajor: bool,
    config: GemmConfig,
    kernel: str,
) -> Tensor:
    """epilogue(a @ B) (M, N) in a's dtype, by the Triton kernel ``kernel`` (no device checks:
    CUDA, or CPU under TRITON_INTERPRET=1). B = b^T for b (N, K) if ``b_kmajor``, else b (K, N)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    cfg = config
    a, b = a.contiguous(), b.contiguous()
    M, K = a.shape
    N = b.size(0) if b_kmajor else b.size(1)
    if (b.size(1) if b_kmajor else b.size(0)) != K:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0:
        return out
    post = out if post is None else post.contiguous()  # the forward's epilogue reads no post
    if post.shape != out.shape:
        raise ValueError(f"post must be {tuple(out.shape)}, got {tuple(post.shape)}")
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if kernel == "tma" and _tma_ok(a, b, out, post):
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        sms = sm_count(a.device.index or 0) if a.is_cuda else 4
        programs = min(tiles, sms * cfg.per_sm)
        split = bn // cfg.epi_split
        _relu2_gemm_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(a, [bm, bk]),
            TensorDescriptor.from_tensor(b, [bn, bk] if b_kmajor else [bk, bn]),
            TensorDescriptor.from_tensor(out, [bm, split]),
            TensorDescriptor.from_tensor(post, [bm, split]),
            M, N, K,
            EPILOGUE=epilogue, B_KMAJOR=b_kmajor, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=cfg.group_m, EPI_SPLIT=cfg.epi_split, NUM_PROGRAMS=programs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _relu2_gemm_kernel[grid](
        a, b, out, post, M, N, K, a.stride(0), b.stride(0),
        EPILOGUE=epilogue, B_KMAJOR=b_kmajor, EVEN_K=K % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def fc_relu2_kernel(
    x: Tensor, w1: Tensor, config: GemmConfig | None = None, kernel: str | None = None
) -> Tensor:
    """post = relu(x @ w1^T)^2 by kernel 1: x (M, D), w1 (H, D) -> (M, H) in x's dtype."""
    return _gemm(x, w1, None, 0, True, config or FWD_CONFIG, kernel or KERNEL)


def grad_pre_kernel(
    dy: Tensor,
    w2: Tensor,
    post: Tensor,
    config: GemmConfig | None = None,
    kernel: str | None = None,
) -> Tensor:
    """dpre = (dy @ w2) * 2 sqrt(post) by kernel 2: dy (M, D), w2 (D, H), post (M, H)."""
    return _gemm(dy, w2, post, 1, False, config or BWD_CONFIG, kernel or KERNEL)


def _use_triton(t: Tensor) -> bool:
    return triton is not None and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def fc_relu2(x: Tensor, w1: Tensor) -> Tensor:
    """post = relu(x @ w1^T)^2: kernel 1 on CUDA (16-bit), else PyTorch (the same math)."""
    return fc_relu2_kernel(x, w1) if _use_triton(x) else _fc_relu2_torch(x, w1)


def grad_pre(dy: Tensor, w2: Tensor, post: Tensor) -> Tensor:
    """dpre = (dy @ w2) * 2 sqrt(post): kernel 2 on CUDA (16-bit), else PyTorch."""
    return grad_pre_kernel(dy, w2, post) if _use_triton(dy) else _grad_pre_torch(dy, w2, post)


# ---------------------------------------------------------------- the ops
# Inside the ops autocast is off: the dtypes are the callers' (``relu2_mlp`` casts first).
@torch.library.custom_op("muongpt::relu2_mlp_fwd", mutates_args=())
def relu2_mlp_fwd(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, D), w1 (H, D), w2 (D, H), one dtype -> (y (M, D), post (M, H)); post is kept for
    the backward."""
    with torch.autocast(x.device.type, enabled=False):
        post = fc_relu2(x, w1)
        return torch.mm(post, w2.t()), post


@relu2_mlp_fwd.register_fake
def _relu2_mlp_fwd_fake(x, w1, w2):
    M = x.size(0)
    return x.new_empty((M, w2.size(0))), x.new_empty((M, w1.size(0)))


@torch.library.custom_op("muongpt::relu2_mlp_grad_pre", mutates_args=())
def relu2_mlp_grad_pre(dy: Tensor, w2: Tensor, post: Tensor) -> Tensor:
    """dpre = (dy @ w2) * 2 sqrt(post): dy (M, D), w2 (D, H), post (M, H) -> (M, H)."""
    with torch.autocast(dy.device.type, enabled=False):
        return grad_pre(dy, w2, post)


@relu2_mlp_grad_pre.register_fake
def _relu2_mlp_grad_pre_fake(dy, w2, post):
    return dy.new_empty((dy.size(0), w2.size(1)))


def _setup_context(ctx, inputs, output):
    x, w1, w2 = inputs
    _, post = output
    ctx.save_for_backward(x, w1, w2, post)
    # post is an output for the backward's sake only: no gradient flows into it, and none is
    # materialized (that would be an (M, H) zero fill).
    ctx.mark_non_differentiable(post)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _grad_post):
    x, w1, w2, post = ctx.saved_tensors
    if dy is None:
        return None, None, None
    dy = dy.to(post.dtype)
    need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
    dx = dw1 = dw2 = None
    if need_w2:
        dw2 = dy.t().mm(post)
    if need_x or need_w1:
        dpre = relu2_mlp_grad_pre(dy, w2, post)
        dx = dpre.mm(w1) if need_x else None
        dw1 = dpre.t().mm(x) if need_w1 else None
    return dx, dw1, dw2


relu2_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def relu2_mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """proj(relu(fc(x))^2) for x (..., D), w1 = fc.weight (H, D), w2 = proj.weight (D, H).

    Computed in autocast's dtype where autocast is on (else x's): x and the weights are cast to
    it here, so, as with nn.Linear under autocast, y comes out in that dtype (bf16) and the
    gradients go back in x's and the weights' own dtypes (fp32 parameters get fp32 gradients).
    The fused kernels run where ``fused_mlp_usable(x)``; elsewhere the op is PyTorch math."""
    dtype = matmul_dtype(x)
    x2 = x.reshape(-1, x.size(-1)).to(dtype).contiguous()
    y, _ = relu2_mlp_fwd(x2, w1.to(dtype).contiguous(), w2.to(dtype).contiguous())
    return y.view(*x.shape[:-1], w2.size(0))


def fused_mlp_usable(x: Tensor, hidden: int | None = None) -> bool:
    """True when ``relu2_mlp`` runs the Triton kernels on ``x``: CUDA, Triton, compute dtype
    (autocast's, else x's) bf16, compute capability >= 8.0 (tuned for Hopper), D and the hidden
    width (if given) multiples of 16. Otherwise callers should use the plain PyTorch MLP.
    Safe to call inside torch.compile (the device query is constant-folded)."""
    if triton is None or not x.is_cuda or matmul_dtype(x) != torch.bfloat16:
        return False
    if x.size(-1) % 16 != 0 or (hidden is not None and hidden % 16 != 0):
        return False
    return torch.cuda.get_device_properties(x.device).major >= 8


class FusedMLP(MLP):
    """The model's MLP with ReLU^2 in the Triton GEMM epilogues where ``fused_mlp_usable``
    (CUDA, bf16); elsewhere the plain MLP. Built by the ``fused_mlp`` converter."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.fc, self.proj = mlp.fc, mlp.proj

    def forward(self, x: Tensor) -> Tensor:
        if fused_mlp_usable(x, self.fc.out_features):
            return relu2_mlp(x, self.fc.weight, self.proj.weight)
        return super().forward(x)
