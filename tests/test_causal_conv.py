"""PoM's causal depthwise convolution as one op (kernels/causal_conv.py).

On CPU: the op's PyTorch path and its backward equal the module's convolution (``PoM.local``)
and its autograd in float64, rows kept apart. Under Triton's interpreter (on CPU,
``kernel_marks.py``) and on CUDA: both kernels against the float64 reference at shapes that cut
the tiles.
"""

from __future__ import annotations

import pytest
import torch

from kernel_marks import needs_gpu, needs_interpreter
from muongpt.kernels import causal_conv as C
from muongpt.kernels.pom import FusedPoM
from test_pom import make_pom


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(B, T, D, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, D, generator=g),
        torch.randn(k, D, generator=g),
        torch.randn(B, T, D, generator=g),
    )


@pytest.mark.parametrize("T,k", [(37, 4), (5, 3), (2, 4), (9, 1)])
def test_op_equals_module_convolution_and_its_autograd(T, k):
    pom = make_pom(dim=24, conv=k)
    x = torch.randn(3, T, 24, dtype=torch.float64, requires_grad=True)
    du = torch.randn(3, T, 24, dtype=torch.float64)
    want = pom.local(x)
    want_dx, want_dw = torch.autograd.grad(want, [x, pom.conv_weight], du)
    got = C.causal_conv(x, pom.conv_weight.view(k, 24), torch.float64)
    got_dx, got_dw = torch.autograd.grad(got, [x, pom.conv_weight], du)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dx, want_dx)
    torch.testing.assert_close(got_dw, want_dw)


def test_op_rounds_once_to_the_requested_dtype():
    x, w, _ = case(2, 20, 16, 4)
    u = C.causal_conv(x, w, torch.bfloat16)
    assert u.dtype == torch.bfloat16
    exact = C.causal_conv_reference(x.double(), w.double(), torch.float64)
    torch.testing.assert_close(u, exact.to(torch.bfloat16), rtol=0, atol=0)


def test_fused_pom_convolution_under_autocast_is_bf16_and_as_close_as_the_module():
    pom = make_pom(dim=24, conv=4, dtype=torch.float32)
    fused = FusedPoM(pom)
    x = torch.randn(2, 30, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, got = pom.local(x), fused.fused_local(x)
    assert got.dtype == plain.dtype == torch.bfloat16
    exact = C.causal_conv_reference(x.double(), pom.conv_weight.double().view(4, 24), torch.float64)
    assert rel_err(got, exact) <= rel_err(plain, exact)  # one rounding against several
    du = torch.randn(2, 30, 24).to(torch.bfloat16)
    dx, dw = torch.autograd.grad(got, [x, pom.conv_weight], du)
    w = pom.conv_weight.detach().double().view(4, 24)
    exact_dx, exact_dw = C.causal_conv_backward_reference(x.detach().double(), w, du.double())
    assert dx.dtype == dw.dtype == torch.float32  # the input's and the parameter's
    assert rel_err(dx, exact_dx) < 1e-6 and rel_err(dw.view(4, 24), exact_dw) < 1e-6


def check_kernels(device, B, T, D, k, out_dtype, tol):
    x, w, du = (t.to(device) for t in case(B, T, D, k))
    u = C.conv_forward_kernel(x, w, out_dtype)
    ref = C.causal_conv_reference(x.double(), w.double(), torch.float64)
    assert u.dtype == out_dtype
    assert rel_err(u, ref) < tol
    dx, dw = C.conv_backward_kernel(x, w, du.to(out_dtype))
    ref_dx, ref_dw = C.causal_conv_backward_reference(
        x.double(), w.double(), du.to(out_dtype).double()
    )
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dw.shape == (k, D)
    assert rel_err(dx, ref_dx) < tol
    assert rel_err(dw, ref_dw) < tol


# T not a multiple of BLOCK_T, D not a multiple of BLOCK_D, rows shorter than the taps
KERNEL_CASES = [(3, 70, 200, 4), (2, 33, 24, 3), (4, 2, 130, 4), (1, 64, 128, 1)]


@needs_interpreter
@pytest.mark.parametrize("B,T,D,k", KERNEL_CASES)
def test_interpreted_kernels_match_float64_reference(B, T, D, k):
    check_kernels("cpu", B, T, D, k, torch.float32, tol=1e-6)


@needs_gpu
@pytest.mark.parametrize("B,T,D,k", KERNEL_CASES)
def test_gpu_kernels_match_float64_reference(B, T, D, k):
    check_kernels("cuda", B, T, D, k, torch.float32, tol=1e-6)
    check_kernels("cuda", B, T, D, k, torch.bfloat16, tol=1e-2)
