"""The fused fp8 head + soft-capped cross-entropy (model/fp8_loss.py).

On CPU: the PyTorch reference of the kernels' math equals autograd through the plain path. On an
fp8 GPU: the Triton kernels equal that reference, and the fused op's loss and gradients equal the
unfused fp8 path and stay within the fp8 bounds of the bf16 computation, eager and compiled.
"""

import pytest
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.kernels import fp8, fp8_loss
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.kernels.fp8 import fp8_available
from muongpt.model.gpt import GPT, GPTConfig, SoftCap
from muongpt.model.speedrun import SpeedrunConfig

needs_fp8 = pytest.mark.skipif(
    not (fp8_available() and fp8_loss.triton is not None),
    reason="needs a CUDA GPU with fp8 (cc >= 8.9) and Triton",
)
SIG = (30.0, 7.5, 0.0)  # the speed-run model's sigmoid cap


def cap_params(softcap, value, sig=SIG):
    """The kernels' (mode, A, B, C) of a model soft-cap, as the fused head passes them."""
    cap = {"none": SoftCap(), "tanh": SoftCap.tanh(value), "sigmoid": SoftCap("sigmoid", *sig)}
    return fp8_loss.cap_mode(cap[softcap].kernel_form())


def capped_gpt(cap: SoftCap, converters=(), scales=(2.0, 32.0, 2.0**29), **config) -> GPT:
    """A core GPT with the given soft-cap and kernel converters."""
    model = GPT(GPTConfig(**config))
    model.lm_head.cap = cap
    return apply_converters(model, KernelsConfig(list(converters), list(scales)))


# (softcap, softcap_value, sigmoid_cap): the last a shifted, lower sigmoid cap
CAPS = [
    ("none", 15.0, SIG),
    ("tanh", 15.0, SIG),
    ("sigmoid", 15.0, SIG),
    ("sigmoid", 15.0, (23.0, 7.5, 5.0)),
]
# The gradient of a mean over T tokens is at most 1/T per entry: grad_scale must keep T = 96..2048
# inside e5m2 (max 57344), as 2^29 does for the 65,536-token rows it was chosen for.
GRAD_SCALE = 2.0**20
SCALES = (2.0, 32.0, 2.0**24)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def plain_loss(logits, targets, softcap, value, sig=SIG):
    z = fp8_loss.capped(logits, *cap_params(softcap, value, sig))[0]
    return F.cross_entropy(z, targets, ignore_index=-1)


def autograd_reference(logits, targets, softcap, value, sig):
    """Loss and d(loss)/d(logits) of the plain path, by autograd, fp32."""
    lf = logits.detach().float().requires_grad_()
    loss = plain_loss(lf, targets, softcap, value, sig)
    loss.backward()
    return loss.detach(), lf.grad


def logits_case(T=96, V=640, seed=0, device="cpu", ignore=()):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(T, V, device=device, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    targets[list(ignore)] = -1
    return logits, targets


@pytest.mark.parametrize("softcap,value,sig", CAPS)
def test_reference_math_equals_autograd_of_the_plain_loss(softcap, value, sig):
    logits, targets = logits_case(ignore=(3, 50))
    loss_ref, grad_ref = autograd_reference(logits, targets, softcap, value, sig)
    mode, a, b, c = cap_params(softcap, value, sig)
    loss, g8 = fp8_loss.reference_loss_and_grad(logits, targets, mode, a, b, GRAD_SCALE, c)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert g8.dtype == torch.float8_e5m2
    assert torch.all(g8[[3, 50]].float() == 0)  # ignored rows: no gradient
    # e5m2 keeps 2 mantissa bits: every entry within 2^-3 relative (plus the subnormal floor)
    deq = g8.float() / GRAD_SCALE
    assert torch.all((deq - grad_ref).abs() <= 0.125 * grad_ref.abs() + 2**-16 / GRAD_SCALE)


MTP_WEIGHTS = torch.tensor([1.0, 0.5, 0.25])


def multi_case(T=96, V=640, seed=0, device="cpu"):
    """Logits and (T, 3) targets: t+1, t+2, t+3 of a random row, -1 past its end."""
    logits, targets = logits_case(T + 2, V, seed, device)
    targets = torch.stack([targets[k : T + k] for k in range(3)], dim=1)
    targets[T - 2 :, 1:] = -1
    targets[T - 1 :, 2:] = -1
    targets[3] = -1  # a row with no targets at all
    return logits[:T], targets


@pytest.mark.parametrize("softcap,value,sig", CAPS)
def test_reference_math_with_several_targets_equals_autograd(softcap, value, sig):
    """Multi-token prediction: the loss sum_k w_k CE(z, target_k) (each summed over its valid
    rows, divided by the rows with a first target) and its gradient."""
    logits, targets = multi_case()
    lf = logits.detach().float().requires_grad_()
    z = fp8_loss.capped(lf, *cap_params(softcap, value, sig))[0]
    n = (targets[:, 0] >= 0).sum()
    loss_ref = sum(
        w * F.cross_entropy(z, targets[:, k], ignore_index=-1, reduction="sum") / n
        for k, w in enumerate(MTP_WEIGHTS)
    )
    loss_ref.backward()
    mode, a, b, c = cap_params(softcap, value, sig)
    loss, g8 = fp8_loss.reference_loss_and_grad(
        logits, targets, mode, a, b, GRAD_SCALE, c, MTP_WEIGHTS
    )
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.all(g8[3].float() == 0)
    deq = g8.float() / GRAD_SCALE
    assert torch.all((deq - lf.grad).abs() <= 0.125 * lf.grad.abs() + 2**-16 / GRAD_SCALE)
    # one target of weight 1 is the plain loss, bit for bit
    one = fp8_loss.reference_loss_and_grad(logits, targets[:, 0], mode, a, b, GRAD_SCALE, c)
    one_k = fp8_loss.reference_loss_and_grad(
        logits, targets[:, :1], mode, a, b, GRAD_SCALE, c, MTP_WEIGHTS[:1]
    )
    assert torch.equal(one[0], one_k[0]) and torch.equal(one[1].float(), one_k[1].float())


def test_kernel_caps_match_the_models_softcap():
    x = torch.linspace(-60, 60, 101)
    for cap in (SoftCap("sigmoid", *SIG), SoftCap.tanh(15.0), SoftCap("sigmoid", 23.0, 7.5, 5.0)):
        torch.testing.assert_close(
            fp8_loss.capped(x, *fp8_loss.cap_mode(cap.kernel_form()))[0], cap(x)
        )
    torch.testing.assert_close(
        SoftCap("sigmoid", 23.0, 7.5, 5.0)(x), 23 * torch.sigmoid((x + 5) / 7.5)
    )
    torch.testing.assert_close(SoftCap.tanh(15.0)(x), 15 * torch.tanh(x / 15))
    with pytest.raises(MuonGPTError, match="sigmoid_cap"):
        SpeedrunConfig(sigmoid_cap=[23.0, 0.0, 5.0])


def test_converters_refuse_unknown_names_and_keep_every_parameter():
    with pytest.raises(MuonGPTError, match="fp8_head_loss already includes fp8_head"):
        capped_gpt(
            SoftCap(), ["fp8_head", "fp8_head_loss"], vocab_size=64, n_layer=1, n_head=1, n_embd=16
        )
    model = capped_gpt(SoftCap(), ["fp8_head_loss"], vocab_size=64, n_layer=1, n_head=1, n_embd=16)
    assert isinstance(model.lm_head, fp8_loss.FP8LossHead)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in GPT(model.config).named_parameters()
    ]


def test_fused_loss_model_falls_back_to_the_plain_path_without_fp8():
    if fp8_available():
        pytest.skip("this machine has an fp8 GPU")
    base = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    plain = capped_gpt(SoftCap("sigmoid", *SIG), **base)
    fused = capped_gpt(SoftCap("sigmoid", *SIG), ["fp8_head_loss"], **base)
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(fused(idx, idx), plain(idx, idx))


def _cpu_scaled_mm() -> bool:
    try:
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch has no CPU _scaled_mm")
@pytest.mark.parametrize("sig", [SIG, (23.0, 7.5, 5.0)])
def test_op_wiring_on_cpu_equals_the_unfused_fp8_path(monkeypatch, sig):
    """The op around the kernels (quantization, the incoming gradient folded into the backward's
    scales, the transposed dW), with the kernels' PyTorch reference in their place: equal to the
    unfused fp8 head + plain loss, as the CUDA test below checks with the kernels."""
    monkeypatch.setattr(fp8_loss, "loss_and_grad", fp8_loss.reference_loss_and_grad)
    g = torch.Generator().manual_seed(0)
    T, D, V = 256, 64, 512
    scales = (2.0, 32.0, 2.0**18)  # 2^18 / 253 rows stays inside e5m2
    x = F.rms_norm(torch.randn(T, D, generator=g), (D,)).to(torch.bfloat16)
    w = torch.randn(V, D, generator=g) * 0.05
    t = torch.randint(0, V, (T,), generator=g)
    t[:3] = -1
    fused = _run(
        lambda a, b, t: fp8_loss.fp8_cross_entropy(a, b, t, scales, ("sigmoid", *sig)), x, w, t
    )
    unfused = _run(
        lambda a, b, t: plain_loss(fp8.fp8_linear(a, b, scales, True), t, "sigmoid", 15.0, sig),
        x, w, t,
    )  # fmt: skip
    exact = _run(
        lambda a, b, t: plain_loss(F.linear(a.float(), b), t, "sigmoid", 15.0, sig), x, w, t
    )
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-5)
    if sig == SIG:
        assert rel_err(fused[1], unfused[1]) < 0.02 and rel_err(fused[2], unfused[2]) < 0.02
    # whatever the cap, the fused path is no further from the exact gradients than the unfused
    for i in (1, 2):
        assert rel_err(fused[i], exact[i]) <= 1.05 * rel_err(unfused[i], exact[i])


# ---------------------------------------------------------------- on an fp8 GPU
@needs_fp8
@pytest.mark.parametrize("softcap,value,sig", CAPS)
@pytest.mark.parametrize("shape", [(256, 50304), (200, 1000)])
def test_kernels_equal_the_reference(softcap, value, sig, shape):
    logits, targets = logits_case(*shape, seed=1, device="cuda", ignore=(7,))
    mode, a, b, c = cap_params(softcap, value, sig)
    loss_ref, g_ref = fp8_loss.reference_loss_and_grad(logits, targets, mode, a, b, GRAD_SCALE, c)
    loss, g = fp8_loss.loss_and_grad(logits, targets, mode, a, b, GRAD_SCALE, c)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert g.shape == shape and g.dtype == torch.float8_e5m2 and g.is_contiguous()
    # exp/sigmoid differ in the last bits between Triton and PyTorch: an entry may round to the
    # neighbouring e5m2 value, never further
    deq, deq_ref = g.float(), g_ref.float()
    assert torch.all((deq - deq_ref).abs() <= 0.25 * deq_ref.abs() + 2**-16)
    assert (g.view(torch.uint8) == g_ref.view(torch.uint8)).float().mean() > 0.999


@needs_fp8
@pytest.mark.parametrize("softcap,value,sig", CAPS)
@pytest.mark.parametrize("shape", [(256, 50304), (200, 1000)])
def test_kernels_with_several_targets_equal_the_reference(softcap, value, sig, shape):
    logits, targets = multi_case(*shape, seed=1, device="cuda")
    weights = MTP_WEIGHTS.cuda()
    mode, a, b, c = cap_params(softcap, value, sig)
    args = (mode, a, b, GRAD_SCALE, c, weights)
    loss_ref, g_ref = fp8_loss.reference_loss_and_grad(logits, targets, *args)
    loss, g = fp8_loss.loss_and_grad(logits, targets, *args)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    deq, deq_ref = g.float(), g_ref.float()
    assert torch.all((deq - deq_ref).abs() <= 0.25 * deq_ref.abs() + 2**-16)
    assert (g.view(torch.uint8) == g_ref.view(torch.uint8)).float().mean() > 0.999


def _head_case(T=2048, D=768, V=50304, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = F.rms_norm(torch.randn(T, D, device="cuda", generator=g), (D,)).to(torch.bfloat16)
    w = torch.randn(V, D, device="cuda", generator=g) * 0.05
    targets = torch.randint(0, 50257, (T,), device="cuda", generator=g)
    targets[:5] = -1
    return x, w, targets


def _run(fn, x, w, targets, grad_loss=0.5):
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    loss = fn(xg, wg, targets)
    (loss * grad_loss).backward()
    return loss.detach(), xg.grad, wg.grad


def _fused(x, w, t):
    return fp8_loss.fp8_cross_entropy(x, w, t, SCALES, ("sigmoid", *SIG))


def _unfused_fp8(x, w, t):
    logits = fp8.fp8_linear(x, w, SCALES, fp8_dw=True)
    return plain_loss(logits, t, "sigmoid", 15.0)


def _bf16(x, w, t):
    return plain_loss(F.linear(x, w.to(torch.bfloat16)), t, "sigmoid", 15.0)


@needs_fp8
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_op_equals_the_unfused_fp8_path_and_is_close_to_bf16(seed):
    x, w, t = _head_case(seed=seed)
    loss, dx, dw = _run(_fused, x, w, t)
    loss_u, dx_u, dw_u = _run(_unfused_fp8, x, w, t)
    loss_b, dx_b, dw_b = _run(_bf16, x, w, t)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    # same fp8 logits: the loss differs by fp32 rounding only; the gradients by e5m2 rounding
    torch.testing.assert_close(loss, loss_u, rtol=1e-5, atol=1e-5)
    assert rel_err(dx, dx_u) < 0.02 and rel_err(dw, dw_u) < 0.02
    # against bf16: the fp8 head's stated bounds (tests/test_fp8.py)
    assert abs(loss.item() - loss_b.item()) < 0.01
    assert rel_err(dx, dx_b) < 0.08 and rel_err(dw, dw_b) < 0.08


@needs_fp8
def test_fused_op_under_torch_compile_equals_eager():
    x, w, t = _head_case(T=1024, seed=2)
    eager = _run(_fused, x, w, t)
    torch._dynamo.reset()
    compiled = _run(torch.compile(_fused, fullgraph=True), x, w, t)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@needs_fp8
def test_fake_kernels_match_real_outputs():
    x, w, t = _head_case(T=256, D=128, V=512, seed=3)
    args = (*SCALES, *cap_params("sigmoid", 15.0))
    t, weights = t[:, None], torch.ones(1, device="cuda")
    real = fp8_loss.fp8_head_loss(x, w, t, weights, *args)
    real_bwd = fp8_loss.fp8_head_loss_backward(torch.ones((), device="cuda"), *real[1:], *args[:3])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw, ft, fwt = (mode.from_tensor(a) for a in (x, w, t, weights))
        fake = fp8_loss.fp8_head_loss(fx, fw, ft, fwt, *args)
        fake_bwd = fp8_loss.fp8_head_loss_backward(
            mode.from_tensor(torch.ones((), device="cuda")), *fake[1:], *args[:3]
        )
    for r, f in zip((*real, *real_bwd), (*fake, *fake_bwd)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@needs_fp8
@pytest.mark.parametrize("sig", [SIG, (23.0, 7.5, 5.0)])
def test_gpt_with_the_fused_loss_trains_like_the_unfused_fp8_head(sig):
    base = dict(vocab_size=50257, n_layer=2, n_head=4, n_embd=256)
    scales = (2.0, 32.0, 2.0**23)
    # The unfused path rounds the logit gradient to bf16, then to e5m2; the fused one once, to
    # e5m2. Under the shifted cap the two differ by up to 3.8% (H100; 4.8% in the CPU op test
    # below, where both stay equally far from fp32), under the default cap by < 3%.
    bound = 0.03 if tuple(sig) == SIG else 0.05
    torch.manual_seed(0)
    unfused = capped_gpt(SoftCap("sigmoid", *sig), ["fp8_head"], scales, **base).cuda()
    fused = capped_gpt(SoftCap("sigmoid", *sig), ["fp8_head_loss"], scales, **base).cuda()
    fused.load_state_dict(unfused.state_dict())
    head = torch.randn_like(unfused.lm_head.weight) * 0.05  # trained scale (it starts at zero)
    with torch.no_grad():
        for m in (fused, unfused):
            m.lm_head.weight.copy_(head)
    idx = torch.randint(0, 50257, (2, 512), device="cuda")
    losses = []
    for m in (fused, unfused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters()):
        if q.grad.norm() == 0:  # e.g. q, k of the first step: the output projections start at 0
            assert p.grad.norm() == 0, name
        else:
            assert rel_err(p.grad, q.grad) < bound, name
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # eval: the plain path
        assert abs(fused(idx, idx.roll(-1, 1)).item() - unfused(idx, idx.roll(-1, 1)).item()) < 1e-4
