"""The symmetric Gram kernel of Newton-Schulz (kernels/newton_schulz.py).

Under Triton's interpreter (on CPU, ``kernel_marks.py``; its tl.dot mishandles bf16, so it
runs fp32) the kernel equals alpha Y Y^T + beta C on edge-sized shapes, its mirrored tiles exactly
symmetric. On a CUDA GPU: the same in bf16 on the d12 shapes, and Newton-Schulz through the kernel
keeps the orthogonality contract and matches the PyTorch path and the float64 iteration.
"""

import sys

import pytest
import torch

from kernel_marks import needs_gpu, needs_interpreter
from muongpt.kernels import newton_schulz as K
from muongpt.optim import newton_schulz


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(batch, m, k, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(batch, m, k, device=device, generator=g) / k**0.5
    c = torch.randn(batch, m, m, device=device, generator=g)
    return y.to(dtype), (c + c.mT).to(dtype)  # C symmetric, as the kernel assumes


@needs_interpreter
@pytest.mark.parametrize("kernel", K.KERNELS)
@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 32, 48), (1, 5, 7), (2, 48, 20)])
def test_interpreter_symmetric_gram_matches_torch(shape, kernel):
    y, c = case(*shape)
    assert K.kernel_usable(y)
    expected = K.symmetric_gram_torch(y.double(), c.double(), alpha=-2.5, beta=0.75)
    out = K.symmetric_gram(y, c, alpha=-2.5, beta=0.75, kernel=kernel)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # tiles off the diagonal are stored mirrored: exactly symmetric there (a diagonal tile is one
    # numpy matmul under the interpreter, symmetric only to rounding; on the GPU it is exact too)
    tile = torch.arange(shape[1]) // 16  # the interpreter's tile (kernels.newton_schulz._launch)
    off = tile[:, None] != tile[None, :]
    assert torch.equal(out[:, off], out.mT[:, off])
    plain = K.symmetric_gram(y.mT.contiguous().mT, kernel=kernel)  # strided input, no C
    torch.testing.assert_close(plain.double(), y.double() @ y.double().mT, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("kernel", K.KERNELS)
@pytest.mark.parametrize("shape", [(8, 768, 768), (4, 768, 3072), (3, 200, 72)])
def test_cuda_symmetric_gram_bf16(shape, kernel):
    y, c = case(*shape, device="cuda", dtype=torch.bfloat16)
    assert K.kernel_usable(y)
    expected = K.symmetric_gram_torch(y.double(), c.double(), alpha=0.5, beta=-2.0)
    out = K.symmetric_gram(y, c, alpha=0.5, beta=-2.0, kernel=kernel)
    assert kernel not in K.FAILED, K.FAILED[kernel]  # it ran, no PyTorch fallback
    assert out.dtype == torch.bfloat16 and out.shape == (shape[0], shape[1], shape[1])
    assert rel_err(out, expected) < 1e-2  # one bf16 rounding of an fp32 accumulator
    assert torch.equal(out, out.mT)
    gram = K.symmetric_gram(y.mT.contiguous().mT, kernel=kernel)  # a transposed (strided) input
    assert rel_err(gram, y.double() @ y.double().mT) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("shape", [(2, 24, 40), (3, 17, 17), (1, 40, 24)])
def test_interpreter_poly_times_matches_baddbmm(shape):
    """The Triton a X + B X (partial tiles in every dimension) equals cuBLAS's form in fp32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], shape[1], shape[1], generator=g)
    out = K.poly_times(b, x, 2.5, product="triton")
    assert "poly_times" not in K.FAILED
    expected = 2.5 * x.double() + b.double() @ x.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("shape", [(8, 768, 768), (4, 768, 3072)])
def test_cuda_poly_times_bf16(shape):
    g = torch.Generator("cuda").manual_seed(5)
    x = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    b = (torch.randn(shape[0], shape[1], shape[1], device="cuda", generator=g) / 30).bfloat16()
    out = K.poly_times(b, x, 2.5, product="triton")
    assert "poly_times" not in K.FAILED, K.FAILED
    assert out.dtype == torch.bfloat16
    assert rel_err(out, 2.5 * x.double() + b.double() @ x.double()) < 1e-2


@needs_gpu
@pytest.mark.parametrize("product", K.PRODUCTS)
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (768, 768)])
def test_cuda_newton_schulz_through_the_kernel(shape, product, monkeypatch):
    monkeypatch.setattr(K, "PRODUCT", product)
    G = torch.randn(4, *shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast = newton_schulz(G, coefficients="polar_express")
    assert not K.FAILED, K.FAILED
    exact = newton_schulz(G.double(), coefficients="polar_express", dtype=torch.float64)
    # A square Gaussian matrix has singular values near 0 that 5 steps cannot lift to 1 (the
    # float64 reference leaves them there too): compare the spectra, not a fixed band.
    s, s_exact = torch.linalg.svdvals(fast.double()), torch.linalg.svdvals(exact)
    assert s.max().item() <= 1.2 and (s - s_exact).abs().max().item() < 0.05
    assert rel_err(fast, exact) < 0.05  # bf16: ~2% after 15 matmuls
    module = sys.modules["muongpt.optim.newton_schulz"]  # muongpt.optim exports the function
    monkeypatch.setattr(module, "kernel_usable", lambda x: False)
    plain = newton_schulz(G, coefficients="polar_express")
    assert rel_err(fast, plain) < 0.05
