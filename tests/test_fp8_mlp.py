"""The fp8 MLP (kernels/fp8_mlp.py) against a float64 reference of its stated math, its
fallback, and the converter. ``torch._scaled_mm`` runs on the CPU in recent torch builds; where
it does not, the tests of the fp8 math skip (they run on CUDA)."""

import pytest
import torch

from muongpt import MuonGPTError
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.kernels.fp8_mlp import FP8MLP, fp8_mlp
from muongpt.model import build_model
from muongpt.model.gpt import MLP, GPTConfig

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def scaled_mm_runs(device: str) -> bool:
    try:
        a = torch.ones(16, 16, device=device).to(E4M3)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not scaled_mm_runs("cpu"), reason="no CPU _scaled_mm")
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
            reason="needs an fp8 GPU",
        ),
    ),
]


def fp8_round(t: torch.Tensor, dtype, fmax: float) -> torch.Tensor:
    """t rounded onto the fp8 grid of its own per-tensor scale, back in float64. The scale and
    t * scale are fp32, as the kernels' are: bf16 activations times 448 / amax land exactly on
    fp8 rounding ties often enough that a float64 product rounds some of them the other way."""
    scale = torch.tensor(fmax, dtype=torch.float32) / t.abs().max().float().cpu()
    scaled = (t.float().cpu() * scale).clamp(-fmax, fmax)
    return scaled.to(dtype).double() / scale.double()


def reference(x, w1, w2, dy):
    """The module docstring's math in float64 on the CPU, each bf16 output rounded as the kernels
    do."""
    bf16 = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    x, w1, w2, dy = (t.double().cpu() for t in (x, w1, w2, dy))
    pre = bf16(fp8_round(x, E4M3, 448.0) @ fp8_round(w1, E4M3, 448.0).T)
    post = bf16(pre.clamp(min=0).square())
    y = fp8_round(post, E4M3, 448.0) @ fp8_round(w2, E4M3, 448.0).T
    dpost = bf16(fp8_round(dy, E5M2, 57344.0) @ fp8_round(w2, E4M3, 448.0))
    dpre = dpost * 2 * post.sqrt()
    return y, {"x": dpre @ w1, "w1": dpre.T @ x, "w2": dy.T @ post}


def inputs(device, seed=0, M=128, D=64, H=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g)
    x = (x / x.square().mean(-1, keepdim=True).sqrt()).to(torch.bfloat16)  # post-RMSNorm
    w1 = torch.randn(H, D, generator=g) / D**0.5
    w2 = torch.randn(D, H, generator=g) / H**0.5
    dy = (torch.randn(M, D, generator=g) * 1e-4).to(torch.bfloat16)  # a small gradient
    return [t.to(device) for t in (x, w1, w2, dy)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_equal_the_float64_reference(device, seed):
    x, w1, w2, dy = inputs(device, seed)
    x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()
    y = fp8_mlp(x, w1, w2)
    y.backward(dy)
    y_ref, grads = reference(x.detach(), w1.detach(), w2.detach(), dy)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape

    def close(a, b):  # within a few bf16 roundings, relative (CUDA's fast fp8 accumulation too)
        return (a.double().cpu() - b.cpu()).norm().item() <= 1e-2 * b.cpu().norm().item()

    assert close(y, y_ref)
    assert close(x.grad, grads["x"]) and x.grad.dtype == torch.bfloat16
    assert close(w1.grad, grads["w1"]) and w1.grad.dtype == torch.float32
    assert close(w2.grad, grads["w2"])
    # and it is fp8: the exact MLP is further away than the rounding the check allows
    exact = (x.detach().double() @ w1.detach().double().T).clamp(min=0).square()
    exact = exact @ w2.detach().double().T
    assert not close(y, exact.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_scales_follow_the_tensors_outliers_and_zero_weights(device):
    x, w1, w2, _ = inputs(device, seed=1)
    x = x.clone()
    x[3, 5] = 300.0  # an outlier far past a fixed scale's range: scaled to e4m3's max, no NaN
    y = fp8_mlp(x, w1, w2)
    assert torch.isfinite(y).all()
    y_ref, _ = reference(x, w1, w2, torch.ones_like(x))
    assert (y.double().cpu() - y_ref.cpu()).abs().max() <= 1e-2 * y_ref.abs().max()
    zero = fp8_mlp(x, w1, torch.zeros_like(w2))  # the zero-initialised down projection
    assert zero.abs().max() == 0


def test_fallback_is_the_plain_mlp_and_the_converter_keeps_parameters():
    torch.manual_seed(0)
    mlp = MLP(64, 4)
    fp8 = FP8MLP(mlp)
    assert fp8.fc is mlp.fc and fp8.proj is mlp.proj
    x = torch.randn(2, 16, 64)
    if not torch.cuda.is_available():
        assert not fp8.fp8_ok
    assert torch.equal(fp8(x), mlp(x))  # CPU tensors always take the plain path
    model = build_model(GPTConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=64))
    names = {n for n, _ in model.named_parameters()}
    apply_converters(model, KernelsConfig(converters=["fp8_mlp"]))
    assert all(isinstance(b.mlp, FP8MLP) for b in model.blocks)
    assert {n for n, _ in model.named_parameters()} == names
    with pytest.raises(MuonGPTError, match="both replace the MLP"):
        apply_converters(model, KernelsConfig(converters=["fp8_mlp", "fused_mlp"]))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an fp8 GPU",
)
def test_compiled_equals_eager_on_cuda():
    x, w1, w2, dy = inputs("cuda", M=1024, D=768, H=3072)
    outs = []
    for fn in (fp8_mlp, torch.compile(fp8_mlp)):
        ws = [w1.clone().requires_grad_(), w2.clone().requires_grad_()]
        xi = x.clone().requires_grad_()
        y = fn(xi, *ws)
        y.backward(dy)
        outs.append([y, xi.grad, *(w.grad for w in ws)])
    for a, b in zip(*outs):
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()
