"""Muon's momentum/Nesterov kernel (kernels/muon_pointwise.py) against its PyTorch form.

Under Triton's interpreter (on CPU tensors, ``kernel_marks.py``), and on a CUDA GPU at
d12's shapes: the momentum buffers and the stack of updates (wide, the tall matrices transposed)
equal the PyTorch form's, and a Muon step through the kernel equals one without it.
"""

import pytest
import torch

from kernel_marks import needs_gpu, needs_interpreter
from muongpt.kernels import muon_pointwise as K
from muongpt.optim import Muon


def matrices(shapes, device, seed=0):
    """(grads, momentum buffers) of matrices of ``shapes`` (fp32, the buffers non-zero)."""
    g = torch.Generator(device=device).manual_seed(seed)
    grads = [torch.randn(s, generator=g, device=device) for s in shapes]
    bufs = [torch.randn(s, generator=g, device=device) for s in shapes]
    return grads, bufs


def run_both(shapes, n_wide, nesterov, device, dtype):
    wide = min(shapes[0]), max(shapes[0])
    grads, bufs = matrices(shapes, device)
    ref_bufs = [b.clone() for b in bufs]
    ref = torch.empty(len(shapes), *wide, device=device, dtype=dtype)
    K.momentum_into_stack_torch(grads, ref_bufs, ref, n_wide, 0.9, nesterov)
    assert K.kernel_usable(ref, grads, bufs)
    got = torch.full_like(ref, float("nan"))
    K.momentum_into_stack(grads, bufs, got, n_wide, 0.9, nesterov)
    return bufs, ref_bufs, got, ref


@needs_interpreter
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize(
    "shapes,n_wide", [([(20, 36), (20, 36), (36, 20)], 2), ([(17, 17)] * 3, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the stack's
def test_interpreted_kernel_equals_the_pytorch_form(shapes, n_wide, nesterov, dtype):
    bufs, ref_bufs, got, ref = run_both(shapes, n_wide, nesterov, "cpu", dtype)
    for b, r in zip(bufs, ref_bufs):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # one rounding to bf16 of near-equal values
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)  # every slot written


def run_apply(shape, n, tall, wd, cautious, device, dtype):
    g = torch.Generator(device=device).manual_seed(1)
    natural = (shape[1], shape[0]) if tall else shape
    weights = [torch.randn(natural, generator=g, device=device) for _ in range(n)]
    update = torch.randn(n, *shape, generator=g, device=device).to(dtype)
    ref = [w.clone() for w in weights]
    K.apply_stack_torch(ref, update, tall, 0.1, wd, cautious, 1.5)
    assert K.kernel_usable(update, weights, [])
    K.apply_stack(weights, update, tall, 0.1, wd, cautious, 1.5)
    return weights, ref


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the update's (the stack's)
@pytest.mark.parametrize("wd,cautious", [(0.0, False), (0.3, False), (0.3, True)])
@pytest.mark.parametrize("tall", [False, True])
def test_interpreted_apply_kernel_equals_the_pytorch_form(tall, wd, cautious, dtype):
    weights, ref = run_apply((20, 36), 3, tall, wd, cautious, "cpu", dtype)
    for w, r in zip(weights, ref):
        torch.testing.assert_close(w, r, rtol=1e-6, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("normuon,wd,cautious", [(False, 0.0, False), (True, 0.1, True)])
def test_interpreted_muon_step_equals_the_pytorch_path(monkeypatch, normuon, wd, cautious):
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16)]
    steps = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(K, "kernel_usable", lambda *a: False)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = Muon(params, lr=0.02, normuon=normuon, weight_decay=wd, cautious_wd=cautious,
                   ns_dtype=torch.float32)  # fmt: skip
        for step in range(2):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        steps.append([p.detach().clone() for p in params])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("nesterov", [True, False])
def test_cuda_kernel_equals_the_pytorch_form_on_d12_shapes(nesterov):
    shapes = [(768, 3072)] * 3 + [(3072, 768)] * 2
    bufs, ref_bufs, got, ref = run_both(shapes, 3, nesterov, "cuda", torch.bfloat16)
    for b, r in zip(bufs, ref_bufs):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)
    # one bf16 rounding of values that agree to fp32 rounding
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert (got != ref).float().mean() < 1e-3


@needs_gpu
@pytest.mark.parametrize("tall,cautious", [(False, False), (True, True)])
def test_cuda_apply_kernel_equals_the_pytorch_form_on_d12_shapes(tall, cautious):
    weights, ref = run_apply((768, 3072), 3, tall, 0.1, cautious, "cuda", torch.bfloat16)
    for w, r in zip(weights, ref):
        torch.testing.assert_close(w, r, rtol=1e-6, atol=1e-6)
