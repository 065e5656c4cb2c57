"""Muon's momentum and Nesterov step for a stack of matrices, in one Triton kernel (CUDA).

For each matrix with gradient g and momentum buffer m (fp32, the matrix's own layout):

    m <- m + (1 - beta) (g - m)                       # beta m + (1 - beta) g, in place
    u  = g + beta (m - g)   (Nesterov)   or   u = m
    stack[i] = u in the stack's dtype, wide: (rows, cols) with rows <= cols, a tall matrix
               transposed on the way

PyTorch does this as one multi-tensor lerp plus one lerp per matrix, about 80 launches for d12's
72 matrices, and the tall ones take one more, transposing, copy. Here one launch covers
every matrix of one orientation: the matrices' addresses come from a table of pointers, each
program reads a tile of g and m once, writes m back and the tile of u (a tall matrix's tile is
read in its own layout and transposed in registers). 14 bytes move per fp32 weight instead of 22.

``momentum_into_stack`` runs the kernel on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``,
for tests) and the same math in PyTorch elsewhere, or where the kernel fails to build (warned
once).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from muongpt.kernels.newton_schulz import interpreting
from muongpt.kernels.triton_support import tl, triton

BLOCK = 64  # a 64 x 64 tile per program (fp32 in, the transposed store stays in registers)
FAILED: list[str] = []  # why the kernel could not run here (then PyTorch computes it)


def kernel_usable(stack: Tensor, grads: list[Tensor], bufs: list[Tensor]) -> bool:
    """Triton present; CUDA tensors (or CPU under the interpreter); fp32 contiguous g and m."""
    if triton is None or FAILED:
        return False
    if not (stack.is_cuda or (interpreting() and stack.device.type == "cpu")):
        return False
    return all(
        t.dtype == torch.float32 and t.is_contiguous() and t.device == stack.device
        for t in (*grads, *bufs)
    )


def momentum_into_stack_torch(
    grads: list[Tensor], bufs: list[Tensor], stack: Tensor, n_wide: int, beta: float, nesterov: bool
) -> None:
    """The PyTorch form (the kernel's reference)."""
    for part, tall in ((slice(0, n_wide), False), (slice(n_wide, None), True)):
        if grads[part]:
            _part_torch(grads[part], bufs[part], stack[part], beta, nesterov, tall)


def _part_torch(grads, bufs, out: Tensor, beta: float, nesterov: bool, tall: bool) -> None:
    """Matrices of one orientation. Every write is contiguous: tall matrices go to a stack of
    their own, copied into ``out`` transposed once (a strided write per matrix is slower)."""
    torch._foreach_lerp_(bufs, grads, 1 - beta)
    natural = torch.empty_like(out.mT, memory_format=torch.contiguous_format) if tall else out
    slots = list(natural.unbind(0))
    if nesterov:
        for slot, g, m in zip(slots, grads, bufs):
            torch.lerp(g.view(slot.shape), m.view(slot.shape), beta, out=slot)
    else:
        torch._foreach_copy_(slots, [m.view(s.shape) for m, s in zip(bufs, slots)])
    if tall:
        out.copy_(natural.mT)


if triton is not None:

    @triton.jit
    def _momentum_kernel(
        g_table, m_table, out, first, R, C, beta,
        TALL: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Program (matrix i, row tile, column tile) of stack[first + i], (R, C) wide. The
        # matrix's g and m are (R, C) row-major, or (C, R) where TALL.
        i = tl.program_id(0)
        g = tl.load(g_table + i).to(tl.pointer_type(tl.float32))
        m = tl.load(m_table + i).to(tl.pointer_type(tl.float32))
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        c = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        if TALL:  # read (c, r) tiles along the source's rows, transpose in registers
            src = c[:, None].to(tl.int64) * R + r[None, :]
            inside = (c[:, None] < C) & (r[None, :] < R)
        else:
            src = r[:, None].to(tl.int64) * C + c[None, :]
            inside = (r[:, None] < R) & (c[None, :] < C)
        gt = tl.load(g + src, mask=inside, other=0.0)
        mt = tl.load(m + src, mask=inside, other=0.0)
        mt = mt + (1.0 - beta) * (gt - mt)
        tl.store(m + src, mt, mask=inside)
        if NESTEROV:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
            u = gt + beta * (mt - gt)
        else:
            u = mt
        if TALL:
            u = tl.trans(u)
        dst = (first + i).to(tl.int64) * R * C + r[:, None].to(tl.int64) * C + c[None, :]
        keep = (r[:, None] < R) & (c[None, :] < C)
        tl.store(out + dst, u.to(out.dtype.element_ty), mask=keep)


def _pointer_table(tensors: list[Tensor], device: torch.device) -> Tensor:
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy does not wait for the queued work
        return table.pin_memory().to(device, non_blocking=True)
    return table


def momentum_into_stack(
    grads: list[Tensor], bufs: list[Tensor], stack: Tensor, n_wide: int, beta: float, nesterov: bool
) -> None:
    """Update the momentum buffers ``bufs`` in place from ``grads`` and write each matrix's
    update (Nesterov's, or the momentum) into ``stack`` (n, rows, cols), rows <= cols; the
    first ``n_wide`` matrices are wide, the rest tall (stored transposed)."""
    use_kernel = kernel_usable(stack, grads, bufs)
    for first, last, tall in ((0, n_wide, False), (n_wide, len(grads), True)):
        if first == last:
            continue
        if use_kernel and not FAILED:
            try:
                _launch(grads[first:last], bufs[first:last], stack, first, beta, nesterov, tall)
                continue
            except Exception as e:  # a GPU or Triton that cannot build it: warn once, PyTorch
                if not stack.is_cuda:
                    raise
                FAILED.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                message = f"Muon momentum kernel failed ({FAILED[0]}); using PyTorch"
                warnings.warn(message, stacklevel=2)
        # a launch that failed changed nothing, so this part is computed whole here
        _part_torch(grads[first:last], bufs[first:last], stack[first:last], beta, nesterov, tall)


def _launch(grads, bufs, stack: Tensor, first: int, beta, nesterov: bool, tall: bool) -> None:
    _, R, C = stack.shape
    block = 16 if interpreting() else BLOCK  # the interpreter runs numpy per program
    grid = (len(grads), triton.cdiv(R, block), triton.cdiv(C, block))
    _momentum_kernel[grid](
        _pointer_table(grads, stack.device), _pointer_table(bufs, stack.device), stack, first,
        R, C, float(beta), TALL=tall, NESTEROV=nesterov, BLOCK=block,
    )  # fmt: skip
