"""The ReLU² MLP with the activation fused into GEMM epilogues (model/relu2_mlp.py).

On CPU: the backward formula dpre = (dy W2) * 2 sqrt(post) equals autograd of the plain MLP; the
sqrt of a bf16 post is as accurate as bf16 pre; the op's PyTorch path (the kernels' math: fp32
accumulation, one rounding) matches the plain MLP, eager, under autocast and traced by
torch.compile, and its fake kernels match the real outputs. Under Triton's interpreter (on CPU
with Triton installed, ``kernel_marks.py``) both kernels run on CPU tensors. On a CUDA GPU
(cc >= 8.0): the Triton kernels against the PyTorch math, the fused MLP against fp32 autograd,
eager and compiled.
"""

import pytest
import torch

from kernel_marks import needs_interpreter
from muongpt.kernels import relu2_mlp as R


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gpu_ok() -> bool:
    return (
        torch.cuda.is_available()
        and R.triton is not None
        and torch.cuda.get_device_capability() >= (8, 0)
    )


needs_gpu = pytest.mark.skipif(not _gpu_ok(), reason="needs a CUDA GPU (cc >= 8.0) and Triton")
# Triton's interpreter: its tl.dot mishandles bf16 (it multiplies the raw uint16 bits), so the
# interpreter test runs fp32 and fp16.


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """The fp32 references are exact fp32 (no TF32), whatever other tests have set."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def mlp_case(M=64, D=32, H=128, seed=0, dtype=torch.float32, device="cpu"):
    """x (M, D), w1 (H, D), w2 (D, H) at nn.Linear-like scales, dy (M, D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, D, device=device, generator=g)
    w1 = torch.randn(H, D, device=device, generator=g) / D**0.5
    w2 = torch.randn(D, H, device=device, generator=g) / H**0.5
    dy = torch.randn(M, D, device=device, generator=g)
    return [t.to(dtype) for t in (x, w1, w2, dy)]


def run(fn, x, w1, w2, dy):
    """(y, dx, dw1, dw2) of y = fn(x, w1, w2) with incoming gradient dy."""
    xs = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = fn(*xs)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad for t in xs))


def by_hand(x, w1, w2, dy):
    """The module docstring's formulas, with the epilogue helpers."""
    post = R.relu2(x @ w1.t())
    dpre = R.relu2_grad(dy @ w2, post)
    return post @ w2.t(), dpre @ w1, dpre.t() @ x, dy.t() @ post


# ---------------------------------------------------------------- CPU: the math
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_backward_formula_equals_autograd_of_the_plain_mlp(dtype, tol):
    case = mlp_case(dtype=dtype)
    for got, want in zip(by_hand(*case), run(R.reference_mlp, *case)):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < tol


def test_sqrt_of_bf16_post_is_as_accurate_as_bf16_pre():
    """post = bf16(relu(pre)^2) (one rounding, from fp32): relative error <= 2^-8, so
    sqrt(post) is within 2^-9 of relu(pre), half the 2^-8 bound of bf16 pre itself."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(1_000_000, generator=g) * 3
    pos = pre > 0
    via_post = R.relu2(pre).bfloat16().float().sqrt()
    trick = ((via_post - pre.clamp(min=0)).abs() / pre.abs())[pos]
    plain = ((pre.bfloat16().float() - pre).abs() / pre.abs())[pos]
    assert trick.max() <= 2**-9 * (1 + 1e-4)  # measured 1.947e-3 (2^-9 = 1.953e-3)
    assert plain.max() <= 2**-8 * (1 + 1e-4)
    assert trick.mean() < 0.55 * plain.mean()  # measured 7.0e-4 vs 1.41e-3
    assert torch.all(via_post[~pos] == 0)  # no gradient where pre <= 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_math_in_bf16_is_closer_to_fp32_than_the_plain_bf16_mlp(seed):
    """The op's PyTorch path rounds as the kernels do (post and dpre once each, from fp32).
    Measured against fp32 autograd at these shapes: the fused path 2.3-2.5e-3 on y, dx, dW1,
    dW2; the plain bf16 MLP 3.3-4.1e-3."""
    case = mlp_case(M=512, D=128, H=512, seed=seed, dtype=torch.bfloat16)
    exact = run(R.reference_mlp, *(t.float() for t in case))
    plain = run(R.reference_mlp, *case)
    fused = run(R.relu2_mlp, *case)
    for f, p, e in zip(fused, plain, exact):
        assert f.dtype == torch.bfloat16
        assert rel_err(f, e) < 4e-3
        assert rel_err(f, e) < 1.05 * rel_err(p, e)


# ---------------------------------------------------------------- CPU: the op (PyTorch path)
def test_op_equals_the_plain_mlp_in_fp32():
    x, w1, w2, dy = mlp_case(M=24, D=32, H=128, seed=3)
    x, dy = x.view(2, 12, 32), dy.view(2, 12, 32)  # any leading dims
    got = run(R.relu2_mlp, x, w1, w2, dy)
    want = run(R.reference_mlp, x, w1, w2, dy)
    assert got[0].shape == (2, 12, 32) and got[1].shape == x.shape
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_op_under_autocast_casts_like_nn_linear(x_dtype):
    """Under bf16 autocast with fp32 weights: y in bf16, gradients in x's and the weights' own
    dtypes, values as the plain MLP under autocast (which rounds pre and post twice)."""
    x, w1, w2, dy = mlp_case(M=256, D=64, H=256, seed=4)
    x = x.to(x_dtype)

    def under_autocast(fn):
        def f(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)

        return f

    got = run(under_autocast(R.relu2_mlp), x, w1, w2, dy)
    plain = run(under_autocast(R.reference_mlp), x, w1, w2, dy)
    exact = run(R.reference_mlp, x.float(), w1, w2, dy)
    assert got[0].dtype == plain[0].dtype == torch.bfloat16
    assert got[1].dtype == x_dtype and got[2].dtype == got[3].dtype == torch.float32
    for g, p, e in zip(got, plain, exact):
        assert g.dtype == p.dtype
        assert rel_err(g, e) < 1.05 * rel_err(p, e) + 1e-4


def test_post_output_takes_no_gradient_and_only_needed_grads_are_made():
    x, w1, w2, _ = mlp_case()
    y, post = R.relu2_mlp_fwd(x, w1.requires_grad_(), w2.requires_grad_())
    assert y.requires_grad and not post.requires_grad
    y.sum().backward()  # x needs no gradient: the op skips dx
    assert w1.grad is not None and w2.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
def test_traced_op_equals_eager(autocast):
    """torch.compile traces the ops through their fake kernels and the backward formula
    (aot_eager: the same graphs inductor gets, run without codegen)."""
    x, w1, w2, dy = mlp_case(M=96, D=32, H=128, seed=5)

    def fn(x, w1, w2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return R.relu2_mlp(x, w1, w2) * 2

    eager = run(fn, x, w1, w2, dy)
    torch._dynamo.reset()
    traced = run(torch.compile(fn, backend="aot_eager", fullgraph=True), x, w1, w2, dy)
    for t, e in zip(traced, eager):
        assert t.dtype == e.dtype
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6)


def _fake_vs_real(x, w1, w2, dy):
    y, post = R.relu2_mlp_fwd(x, w1, w2)
    dpre = R.relu2_mlp_grad_pre(dy, w2, post)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw1, fw2, fdy = (mode.from_tensor(t) for t in (x, w1, w2, dy))
        fy, fpost = R.relu2_mlp_fwd(fx, fw1, fw2)
        fdpre = R.relu2_mlp_grad_pre(fdy, fw2, fpost)
    for r, f in zip((y, post, dpre), (fy, fpost, fdpre)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_fake_kernels_match_real_outputs_cpu():
    _fake_vs_real(*mlp_case(M=40, D=32, H=128, dtype=torch.bfloat16))


def test_no_fused_path_on_cpu_and_a_sane_config_table():
    assert not R.fused_mlp_usable(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert R.KERNEL in R.KERNELS
    for cfg in (R.FWD_CONFIG, R.BWD_CONFIG):
        for block in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert block >= 16 and block & (block - 1) == 0
        assert cfg.epi_split in (1, 2) and cfg.per_sm >= 1 and cfg.group_m >= 1


# ---------------------------------------------------------------- Triton interpreter (CPU)
SMALL = R.GemmConfig(32, 64, 32, 4, 2, 4)
SMALL_SPLIT = R.GemmConfig(32, 64, 32, 4, 2, 4, epi_split=2)


@needs_interpreter
@pytest.mark.parametrize("kernel", R.KERNELS)
@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
def test_interpreted_kernels_equal_the_pytorch_math(kernel, config, dtype, tol):
    # M, N, K not multiples of the blocks (200/32, 208/64, 80/32), a partial last group of
    # rows (7 row blocks, groups of 4), and for "tma" more tiles than the 4 programs
    x, w1, w2, dy = mlp_case(M=200, D=80, H=208, seed=6, dtype=dtype)
    post_ref = R._fc_relu2_torch(x, w1)
    post = R.fc_relu2_kernel(x, w1, config, kernel)
    assert post.shape == (200, 208) and post.dtype == dtype
    assert rel_err(post, post_ref) < tol
    dpre = R.grad_pre_kernel(dy, w2, post_ref, config, kernel)
    assert rel_err(dpre, R._grad_pre_torch(dy, w2, post_ref)) < tol


# ---------------------------------------------------------------- on a CUDA GPU
@needs_gpu
@pytest.mark.parametrize("kernel", R.KERNELS)
@pytest.mark.parametrize("M", [1000, 4096])
def test_kernels_equal_the_pytorch_math(kernel, M):
    """Both compute in fp32 and round once to bf16; summation order differs, so an entry may
    land on the neighbouring bf16 value (2^-7 relative), never further."""
    x, w1, w2, dy = mlp_case(M=M, D=768, H=3072, seed=7, dtype=torch.bfloat16, device="cuda")
    post_ref = R._fc_relu2_torch(x, w1)
    dpre_ref = R._grad_pre_torch(dy, w2, post_ref)
    for name, config in (("fwd", R.FWD_CONFIG), ("bwd", R.BWD_CONFIG), ("small", SMALL)):
        post = R.fc_relu2_kernel(x, w1, config, kernel)
        dpre = R.grad_pre_kernel(dy, w2, post_ref, config, kernel)
        for got, want in ((post, post_ref), (dpre, dpre_ref)):
            assert got.shape == want.shape and got.dtype == torch.bfloat16, name
            assert rel_err(got, want) < 1e-3, name
            diff = (got.float() - want.float()).abs()
            assert torch.all(diff <= 2**-7 * want.float().abs() + 1e-5), name


@needs_gpu
def test_tma_kernel_is_taken_on_hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA kernel needs Hopper (cc >= 9.0)")
    x, w1, *_ = mlp_case(M=256, D=768, H=3072, dtype=torch.bfloat16, device="cuda")
    assert R.TensorDescriptor is not None, "this Triton has no triton.tools.tensor_descriptor"
    assert R._tma_ok(x, w1)


def _autocast(fn):
    def f(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(*args)

    return f


@needs_gpu
@pytest.mark.parametrize("kernel", R.KERNELS)
@pytest.mark.parametrize("M", [1000, 8192])
def test_fused_mlp_is_as_close_to_fp32_as_the_plain_bf16_mlp(monkeypatch, kernel, M):
    """bf16 x, fp32 weights under autocast, as in the model. The CPU analogue of this test
    measured the fused path at 2.3-2.5e-3 from fp32, the plain one at 3.3-4.1e-3."""
    monkeypatch.setattr(R, "KERNEL", kernel)
    x, w1, w2, dy = mlp_case(M=M, D=768, H=3072, seed=8, device="cuda")
    x = x.bfloat16()
    assert R.fused_mlp_usable(x, hidden=3072)
    fused = run(_autocast(R.relu2_mlp), x, w1, w2, dy)
    plain = run(_autocast(R.reference_mlp), x, w1, w2, dy)
    exact = run(R.reference_mlp, x.float(), w1, w2, dy)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.bfloat16
    assert fused[2].dtype == fused[3].dtype == torch.float32
    for f, p, e in zip(fused, plain, exact):
        assert rel_err(f, e) < 6e-3
        assert rel_err(f, e) < 1.1 * rel_err(p, e) + 1e-4


@needs_gpu
def test_fused_op_under_torch_compile_equals_eager():
    """As the model would call it: fused_mlp_usable decides inside the compiled region."""
    x, w1, w2, dy = mlp_case(M=2000, D=768, H=3072, seed=9, device="cuda")
    x = x.bfloat16()

    def fn(x, w1, w2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if R.fused_mlp_usable(x, w1.size(0)):
                return R.relu2_mlp(x, w1, w2)
            return R.reference_mlp(x, w1, w2) * 0  # (fails the comparison below)

    eager = run(fn, x, w1, w2, dy)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True), x, w1, w2, dy)
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype
        # the same kernels and cuBLAS calls; allow a bf16 rounding step here and there
        assert rel_err(c, e) < 1e-3


@needs_gpu
def test_fake_kernels_match_real_outputs_cuda():
    _fake_vs_real(*mlp_case(M=1000, D=768, H=3072, dtype=torch.bfloat16, device="cuda"))


@needs_gpu
def test_fused_mlp_usable():
    x = torch.zeros(8, 768, device="cuda")
    assert not R.fused_mlp_usable(x)  # fp32, no autocast
    assert R.fused_mlp_usable(x.bfloat16(), hidden=3072)
    assert not R.fused_mlp_usable(torch.zeros(8, 24, device="cuda", dtype=torch.bfloat16))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert R.fused_mlp_usable(x)  # autocast's dtype counts


@needs_gpu
def test_gpt_with_the_fused_mlp_trains_like_the_plain_mlp():
    """The fused_mlp converter: the same loss and gradients as the plain MLP, within bf16
    rounding (in the speed-run model, whose residual stream is bf16)."""
    from muongpt.kernels.converters import KernelsConfig, apply_converters
    from muongpt.model.speedrun import SpeedrunConfig, SpeedrunGPT

    base = dict(vocab_size=1000, n_layer=2, n_head=4, n_embd=256, value_embeds=0)
    base.update(bigram_rows=0, backout_after=0, attn_window=0)
    torch.manual_seed(0)
    plain = SpeedrunGPT(SpeedrunConfig(**base)).cuda()
    fused = SpeedrunGPT(SpeedrunConfig(**base))
    fused = apply_converters(fused, KernelsConfig(["fused_mlp"])).cuda()
    assert isinstance(fused.blocks[0].mlp, R.FusedMLP)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():  # trained-like weights: the output projections start at zero
        for p, q in zip(plain.parameters(), fused.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
            q.copy_(p)
    idx = torch.randint(0, 1000, (2, 512), device="cuda")
    losses = []
    for m in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-3
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < 0.03, name
