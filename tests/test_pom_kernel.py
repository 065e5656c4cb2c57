"""The fused PoM (kernels/pom.py): its math, the op's wiring, the kernels.

On CPU: the fused form (one matmul to [P | G], ``mix``, the output matmul) equals the module and
the naive float64 masked mean; the op's PyTorch path and its backward equal autograd; the chunk
carries; the ``fused_pom`` converter. Under Triton's interpreter (on CPU with Triton
installed, ``kernel_marks.py``) both kernels run on CPU tensors against the float64 reference.
On a CUDA GPU: the bf16 kernels against the float64 reference, the fused module against the
plain one, eager and compiled.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernel_marks import needs_gpu, needs_interpreter
from muongpt.kernels import pom as K
from muongpt.kernels.converters import KernelsConfig, apply_converters
from test_pom import make_pom, naive_pom


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pg_case(B=2, T=150, E=40, degree=2, heads=1, dtype=torch.float64, device="cpu", seed=0):
    """[P | G] (B, T, S + S/H) at the scale of a trained layer's pre-activations, and dz."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = degree * E
    pg = torch.randn(B, T, S + S // heads, generator=g) * 1.5
    dz = torch.randn(B, T, S, generator=g)
    return pg.to(device, dtype), dz.to(device, dtype)


def fused_by_parts(pom, x, mix):
    """The fused module's forward with ``mix`` for the pointwise middle."""
    w = torch.cat([pom.poly.weight, pom.select.weight])
    return mix(x @ w.T, pom.degree, pom.n_sel_heads) @ pom.proj.weight.T


def grad_by_autograd(pg, dz, degree, heads):
    p = pg.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(K.mix_reference(p, degree, heads), p, dz.double())
    return grad


# ---------------------------------------------------------------- CPU: the math and the op
@pytest.mark.parametrize("degree,expand,heads", [(1, 1, 1), (2, 2, 1), (3, 1, 4), (2, 2, 8)])
def test_fused_form_equals_module_and_naive_mean(degree, expand, heads):
    pom = make_pom(dim=24, degree=degree, expand=expand, n_sel_heads=heads, scan_chunk=8)
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    want = naive_pom(pom, x)
    torch.testing.assert_close(fused_by_parts(pom, x, K.mix_reference), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(fused_by_parts(pom, x, K.pom_mix), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(pom(x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("conv", [0, 4])
def test_fused_module_forward_and_gradients_equal_the_plain_module(conv, monkeypatch):
    # The fused branch of FusedPoM on CPU (the op's PyTorch path): its wiring, not the kernels.
    monkeypatch.setattr(K, "fused_pom_usable", lambda x, pom: True)
    pom = make_pom(dim=24, degree=2, expand=2, n_sel_heads=2, scan_chunk=8, conv=conv)
    fused = K.FusedPoM(pom)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in pom.named_parameters()]
    x = torch.randn(2, 70, 24, dtype=torch.float64)
    dy = torch.randn(2, 70, 24, dtype=torch.float64)
    grads = []
    for module in (pom, fused):
        module.zero_grad()
        xr = x.clone().requires_grad_()
        y = module(xr)
        y.backward(dy)
        grads.append([y, xr.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 64, 77, 130])
@pytest.mark.parametrize("reverse", [False, True])
def test_exclusive_cumsum_across_chunks(n, reverse):
    sums = torch.randn(3, n, 5, dtype=torch.float64)
    got = K._exclusive_cumsum(sums, reverse=reverse)
    for i in range(n):
        part = sums[:, i + 1 :] if reverse else sums[:, :i]
        torch.testing.assert_close(got[:, i], part.sum(dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("degree,heads", [(2, 1), (3, 4)])
def test_op_backward_equals_autograd(degree, heads):
    pg, dz = pg_case(T=70, E=8, degree=degree, heads=heads)
    p = pg.clone().requires_grad_()
    z = K.pom_mix(p, degree, heads)
    torch.testing.assert_close(z, K.mix_reference(pg, degree, heads), rtol=0, atol=0)
    z.backward(dz)
    torch.testing.assert_close(p.grad, grad_by_autograd(pg, dz, degree, heads), rtol=0, atol=1e-12)
    # the saved chunk prefix sums are those the kernels compute
    _, prefix = K.pom_mix_fwd(pg, degree, heads)
    h = K.mix_reference(pg, degree, heads)  # not h, but its shape: check the layout only
    assert (
        prefix.shape == (2, math.ceil(70 / K.CHUNK), h.size(-1)) and prefix.dtype == torch.float32
    )
    assert torch.all(prefix[:, 0] == 0) and prefix[:, 1:].abs().max() > 0


def test_fake_kernels_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    pg, dz = pg_case(T=70, E=8, degree=3, heads=4, dtype=torch.float32)
    z, prefix = K.pom_mix_fwd(pg, 3, 4)
    with FakeTensorMode() as mode:
        fz, fprefix = K.pom_mix_fwd(mode.from_tensor(pg), 3, 4)
        fd = K.pom_mix_bwd(
            mode.from_tensor(pg), mode.from_tensor(prefix), mode.from_tensor(dz), 3, 4
        )
    for fake, real in ((fz, z), (fprefix, prefix), (fd, pg)):
        assert fake.shape == real.shape and fake.dtype == real.dtype


def test_converter_swaps_every_pom_and_keeps_the_function():
    from muongpt.model.gpt import GPT, GPTConfig, MixingConfig

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=97, n_layer=3, n_head=2, n_embd=32, mixing=MixingConfig(["pom", "attention"])
    )
    model = GPT(cfg)
    for b in model.blocks:
        torch.nn.init.normal_(b.mixer.proj.weight, std=0.05)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(idx)
    names = [n for n, _ in model.named_parameters()]
    apply_converters(model, KernelsConfig(converters=["fused_pom"]))
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["FusedPoM", "CausalSelfAttention", "FusedPoM"]
    assert [n for n, _ in model.named_parameters()] == names
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)


# ---------------------------------------------------------------- the kernels (interpreter, GPU)
KERNEL_CASES = [  # (T, E, degree, heads): partial chunks and channel blocks, several chunks
    (150, 40, 2, 1),
    (64, 64, 1, 1),
    (97, 24, 3, 4),
    (130, 72, 2, 2),
]


def check_kernels(device, dtype, T, E, degree, heads, tol):
    pg, dz = pg_case(T=T, E=E, degree=degree, heads=heads, dtype=dtype, device=device)
    z, prefix = K.mix_forward_kernel(pg, degree, heads)
    want = K.mix_reference(pg.double(), degree, heads)
    assert z.dtype == dtype and rel_err(z, want) < tol
    torch.testing.assert_close(
        prefix.double(), K._prefix_torch(pg.double(), degree, heads).double(), rtol=1e-5, atol=1e-4
    )
    dpg = K.mix_backward_kernel(pg, prefix, dz, degree, heads)
    want = grad_by_autograd(pg, dz, degree, heads)
    assert dpg.dtype == dtype
    S = degree * E  # the state part and the gate part, each on its own
    assert rel_err(dpg[..., :S], want[..., :S]) < tol
    assert rel_err(dpg[..., S:], want[..., S:]) < tol


class NotLaunched:
    """Stands in for a kernel the chosen path must not launch."""

    def __getitem__(self, grid):
        raise AssertionError("the other path's kernels ran")


def row_scan_only(monkeypatch):
    monkeypatch.setattr(K, "ROW_SCAN_PROGRAMS_PER_SM", 0)
    monkeypatch.setattr(K, "_h_sums_kernel", NotLaunched())
    monkeypatch.setattr(K, "_u_sums_kernel", NotLaunched())


def two_pass_only(monkeypatch):
    monkeypatch.setattr(K, "ROW_SCAN_PROGRAMS_PER_SM", None)
    monkeypatch.setattr(K, "_mix_fwd_rows_kernel", NotLaunched())
    monkeypatch.setattr(K, "_mix_bwd_rows_kernel", NotLaunched())


def test_single_pass_kernels_run_where_their_programs_fill_the_gpu():
    h200 = 132  # SMs
    # the d12 experiments' 32 rows of 1K at E = 768: 1,536 programs of 16 channels, 11.6 per SM
    assert K._row_scan(32, 768, 4, K.ROW_FWD, h200) and K._row_scan(32, 768, 4, K.ROW_BWD, h200)
    assert not K._row_scan(16, 768, 4, K.ROW_FWD, h200)  # T = 4K: 5.8 per SM, two passes
    # a tile must hold whole selection heads: more heads than channels falls back to two passes
    assert not K._row_scan(32, 768, 2 * K.ROW_BWD.block_c, K.ROW_BWD, h200)


@needs_interpreter
@pytest.mark.parametrize("T,E,degree,heads", KERNEL_CASES)
def test_interpreted_kernels_match_float64_reference(monkeypatch, T, E, degree, heads):
    two_pass_only(monkeypatch)
    check_kernels("cpu", torch.float32, T, E, degree, heads, tol=1e-5)


@needs_interpreter
def test_interpreted_kernels_at_other_launch_shapes(monkeypatch):
    # the passes share the chunks but not the channel blocks
    monkeypatch.setattr(K, "CHUNK", 32)
    monkeypatch.setattr(K, "FWD", K.MixConfig(16, 4))
    monkeypatch.setattr(K, "BWD", K.MixConfig(32, 2))
    two_pass_only(monkeypatch)
    check_kernels("cpu", torch.float32, 100, 40, 2, 4, tol=1e-5)
    monkeypatch.setattr(K, "SUMS", K.MixConfig(64, 4))  # chunk sums in wider tiles than the scan
    check_kernels("cpu", torch.float32, 100, 40, 2, 4, tol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("T,E,degree,heads", KERNEL_CASES)
def test_interpreted_single_pass_kernels_match_float64_reference(monkeypatch, T, E, degree, heads):
    """The single-pass kernels (one program per sequence and channel block) compute the same z,
    chunk prefix sums and d[P | G] as the reference."""
    row_scan_only(monkeypatch)
    check_kernels("cpu", torch.float32, T, E, degree, heads, tol=1e-5)


@needs_gpu
@pytest.mark.parametrize("T,E,degree,heads", [*KERNEL_CASES, (4096, 1536, 2, 1)])
def test_gpu_kernels_match_float64_reference(monkeypatch, T, E, degree, heads):
    two_pass_only(monkeypatch)
    check_kernels("cuda", torch.float32, T, E, degree, heads, tol=1e-5)
    check_kernels("cuda", torch.bfloat16, T, E, degree, heads, tol=1e-2)


@needs_gpu
@pytest.mark.parametrize("T,E,degree,heads", [*KERNEL_CASES, (1024, 1536, 2, 1)])
def test_gpu_single_pass_kernels_match_float64_reference(monkeypatch, T, E, degree, heads):
    row_scan_only(monkeypatch)
    check_kernels("cuda", torch.float32, T, E, degree, heads, tol=1e-5)
    check_kernels("cuda", torch.bfloat16, T, E, degree, heads, tol=1e-2)


@needs_gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("conv,fused_conv", [(0, False), (4, False), (4, True)])
def test_gpu_fused_module_matches_plain_under_autocast(monkeypatch, compile, conv, fused_conv):
    monkeypatch.setattr(K, "FUSED_CONV", fused_conv)
    torch.manual_seed(0)
    pom = make_pom(dim=256, degree=2, expand=2, scan_chunk=256, dtype=torch.float32, conv=conv)
    pom = pom.cuda()
    fused = K.FusedPoM(pom)
    x = torch.randn(4, 1024, 256, device="cuda")
    dy = torch.randn(4, 1024, 256, device="cuda")
    exact = make_pom(dim=256, degree=2, expand=2, dtype=torch.float64, conv=conv).cuda()
    exact.load_state_dict(pom.state_dict())

    def run(module, x, autocast=True):
        module.zero_grad()
        x = x.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        y.backward(dy.to(y.dtype))
        return [y, x.grad, *(p.grad for p in module.parameters())]

    ref = run(exact, x.double(), autocast=False)
    got = run(torch.compile(fused) if compile else fused, x)
    plain = run(pom, x)
    for g, p, r in zip(got, plain, ref):
        assert rel_err(g, r) < 1.5 * rel_err(p, r) + 1e-3  # at least as close as the plain bf16
