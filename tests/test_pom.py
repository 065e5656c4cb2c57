"""PoM: causality, equality with a naive O(T^2) reference, incremental decoding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.model.pom import PoM, PoMCache, causal_mean


def make_pom(
    dim=24, degree=2, expand=2, n_sel_heads=1, scan_chunk=256, dtype=torch.float64, seed=0, conv=0
):
    """A PoM whose output projection (and convolution) is random, not zero (not the identity):
    a zero projection hides every bug."""
    torch.manual_seed(seed)
    pom = PoM(dim, degree, expand, n_sel_heads, conv=conv, scan_chunk=scan_chunk).to(dtype)
    with torch.no_grad():
        pom.proj.weight.normal_(std=1 / math.sqrt(pom.state_dim))
        if conv:
            pom.conv_weight.normal_()
    return pom


def naive_pom(pom: PoM, x: torch.Tensor) -> torch.Tensor:
    """PoM written straight from the formula, with the causal mean as a T x T masked average."""
    B, T, D = x.shape
    if pom.conv:  # u_t = Σ_j w_j ⊙ x_{t-j}, token by token
        w = pom.conv_weight.view(pom.conv, D)
        x = torch.stack(
            [sum(w[j] * x[:, t - j] for j in range(min(pom.conv, t + 1))) for t in range(T)], 1
        )
    width = pom.expand * D
    w_poly = pom.poly.weight
    parts, running = [], None
    for i in range(pom.degree):
        a = F.gelu(x @ w_poly[i * width : (i + 1) * width].T)
        running = a if running is None else running * a
        parts.append(running)
    state = torch.cat(parts, dim=-1)  # (B, T, S)
    mask = torch.tril(torch.ones(T, T, dtype=x.dtype))
    weights = mask / mask.sum(dim=1, keepdim=True)  # row t: 1/(t+1) on positions 0..t
    means = torch.einsum("ts,bsc->btc", weights, state)
    gate = torch.sigmoid(x @ pom.select.weight.T)  # (B, T, S / H)
    gate = gate.repeat_interleave(pom.n_sel_heads, dim=-1)  # channel j*H + h uses gate j
    return (gate * means) @ pom.proj.weight.T


# (degree, expand, n_sel_heads, T, scan_chunk, conv): single chunk, padded chunks, exact chunks, ...
CONFIGS = [
    (1, 1, 1, 13, 256, 0),
    (2, 2, 1, 37, 8, 0),
    (3, 1, 4, 64, 16, 0),
    (4, 2, 2, 50, 7, 0),
    (2, 3, 8, 1, 4, 0),
    (2, 2, 1, 37, 8, 4),
    (3, 1, 4, 20, 16, 1),
    (2, 1, 2, 2, 4, 3),
]


@pytest.mark.parametrize("degree,expand,heads,T,chunk,conv", CONFIGS)
def test_matches_naive_masked_mean_in_float64(degree, expand, heads, T, chunk, conv):
    pom = make_pom(
        dim=24, degree=degree, expand=expand, n_sel_heads=heads, scan_chunk=chunk, conv=conv
    )
    x = torch.randn(3, T, 24, dtype=torch.float64)
    y = pom(x)
    ref = naive_pom(pom, x)
    assert y.shape == (3, T, 24) and y.dtype == torch.float64
    assert ref.abs().max() > 0.1  # the comparison is not between two zeros
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("t", [0, 7, 8, 21, 38])
@pytest.mark.parametrize("conv", [0, 4])
def test_module_is_causal(t, conv):
    pom = make_pom(scan_chunk=8, dtype=torch.float32, conv=conv)
    x = torch.randn(2, 40, 24)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 40 - t - 1, 24)
    y, y2 = pom(x), pom(x2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    if t + 1 < 40:
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])
    # And it mixes: changing only token 0 changes every later output.
    x3 = x.clone()
    x3[:, 0] += 1.0
    assert (pom(x3) - y)[:, 1:].abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("conv", [0, 4])
def test_gradient_of_output_t_reaches_only_inputs_up_to_t(conv):
    pom = make_pom(scan_chunk=8, dtype=torch.float64, conv=conv)
    x = torch.randn(2, 30, 24, dtype=torch.float64, requires_grad=True)
    t = 17
    pom(x)[:, t].sum().backward()
    assert torch.all(x.grad[:, t + 1 :] == 0)
    assert torch.all(x.grad[:, : t + 1].abs().amax(dim=-1) > 0)


@pytest.mark.parametrize("steps", [[1] * 29, [5, 1, 12, 3, 8], [29], [2, 1, 26]])
@pytest.mark.parametrize("heads,chunk,conv", [(1, 256, 0), (4, 4, 0), (2, 8, 4)])
def test_incremental_decoding_equals_full_forward(steps, heads, chunk, conv):
    pom = make_pom(degree=3, n_sel_heads=heads, scan_chunk=chunk, conv=conv)
    x = torch.randn(2, sum(steps), 24, dtype=torch.float64)
    full = pom(x)
    cache = pom.new_cache(2)
    buffer = cache.sum.data_ptr()
    outs, pos = [], 0
    for n in steps:
        outs.append(pom(x[:, pos : pos + n], cache=cache))
        pos += n
        assert cache.count == pos
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-10)
    # Constant memory: one (B, S) running sum, updated in place, equal to the sum of all states.
    assert cache.sum.shape == (2, pom.state_dim) and cache.sum.data_ptr() == buffer
    states = pom.polynomial_state(pom.local(x))
    torch.testing.assert_close(cache.sum, states.sum(dim=1), rtol=1e-12, atol=0)
    if conv:  # and the convolution's tail: the last conv - 1 inputs
        torch.testing.assert_close(cache.tail, x[:, -(conv - 1) :], rtol=0, atol=0)


def test_new_cache_accumulates_in_at_least_fp32():
    assert PoM(16, 2, 1).new_cache(3).sum.dtype == torch.float32
    assert PoM(16, 2, 1).bfloat16().new_cache(3).sum.dtype == torch.float32
    cache = PoM(16, 2, 1).double().new_cache(3)
    assert isinstance(cache, PoMCache) and cache.sum.dtype == torch.float64
    assert cache.count == 0 and torch.all(cache.sum == 0) and cache.sum.shape == (3, 2 * 1 * 16)


def test_gradients_reach_every_parameter():
    pom = make_pom(degree=3, n_sel_heads=2, scan_chunk=8, dtype=torch.float32)
    x = torch.randn(2, 20, 24, requires_grad=True)
    (pom(x) * torch.randn(2, 20, 24)).sum().backward()
    for name, p in pom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # every row (output channel) of every matrix gets some gradient
        assert torch.all(p.grad.abs().amax(dim=1) > 0), name
    assert torch.all(x.grad.abs().amax(dim=-1) > 0)


def test_zero_initialized_output_projection():
    # At init the layer outputs exactly zero (the block is the identity) and only the output
    # projection gets a gradient; after one step on it, the gradient reaches the rest.
    torch.manual_seed(0)
    pom = PoM(24, 2, 2)
    assert torch.all(pom.proj.weight == 0) and pom.poly.weight.abs().max() > 0
    x = torch.randn(2, 10, 24)
    y = pom(x)
    assert torch.all(y == 0)
    (y * torch.randn_like(y)).sum().backward()
    assert pom.proj.weight.grad.abs().max() > 0
    assert torch.all(pom.poly.weight.grad == 0) and torch.all(pom.select.weight.grad == 0)
    with torch.no_grad():
        pom.proj.weight -= 0.1 * pom.proj.weight.grad
    pom.zero_grad()
    (pom(x) * torch.randn_like(y)).sum().backward()
    assert pom.poly.weight.grad.abs().max() > 0 and pom.select.weight.grad.abs().max() > 0


def test_causal_mean_accumulates_bf16_in_fp32():
    torch.manual_seed(0)
    T = 4096
    h64 = 1.0 + torch.rand(2, T, 8, dtype=torch.float64)  # positive, like GELU products
    h = h64.bfloat16()
    exact = h.double().cumsum(dim=1) / torch.arange(1, T + 1, dtype=torch.float64).view(1, T, 1)
    means, total = causal_mean(h, chunk=64)
    assert means.dtype == torch.bfloat16 and total.dtype == torch.float32
    rel = ((means.double() - exact) / exact).abs().max()
    assert rel < 2**-8  # one bf16 rounding of the result, nothing accumulated
    # The running sum is kept in fp32: exact to fp32 precision (a bf16 sum is off by ~2e-3).
    torch.testing.assert_close(total.double(), h.double().sum(dim=1), rtol=1e-6, atol=0)


def test_bf16_autocast_forward_is_close_to_fp32():
    pom = make_pom(dim=32, degree=2, expand=2, scan_chunk=64, dtype=torch.float32)
    x = torch.randn(2, 1024, 32)
    ref = pom(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pom(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2
    y.float().square().sum().backward()  # the in-place fp32 scan is differentiable under autocast
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in pom.parameters())


def test_long_sequence_without_a_T_by_T_tensor():
    # A T x T tensor at T = 100,000 would need 80 GB; the linear-time form needs a few MB.
    pom = make_pom(dim=8, degree=2, expand=1, dtype=torch.float64)
    T = 100_000
    x = torch.randn(1, T, 8, dtype=torch.float64)
    y = pom(x)
    # The last output sees the plain mean over the whole sequence.
    gate = torch.sigmoid(x[:, -1] @ pom.select.weight.T)
    expected = (gate * pom.polynomial_state(x).mean(dim=1)) @ pom.proj.weight.T
    torch.testing.assert_close(y[:, -1], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "args,message",
    [
        ((16, 0, 2), "degree"),
        ((16, -1, 2), "degree"),
        ((16, 2, 0), "expand"),
        ((16, 2.5, 2), "degree"),
        ((16, 2, True), "expand"),
        ((16, 2, 2, 0), "n_sel_heads"),
        ((10, 2, 2, 3), "divisible by n_sel_heads"),
        ((0, 2, 2), "dim"),
        ((16, 2, 2, 1, -1), "conv"),
        ((16, 2, 2, 1, 2.0), "conv"),
    ],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(MuonGPTError, match=message):
        if len(args) == 5:
            PoM(*args[:4], conv=args[4])
        else:
            PoM(*args)


def test_convolution_starts_as_the_identity_and_trains_as_a_vector():
    torch.manual_seed(0)
    plain, conv = PoM(24, 2, 2), PoM(24, 2, 2, conv=4)
    torch.nn.init.normal_(plain.proj.weight)
    conv.load_state_dict(plain.state_dict(), strict=False)  # all but conv_weight
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    assert conv.conv_weight.ndim == 1  # the scalar (AdamW) group, not Muon's matrices
    (conv(x) * torch.randn(2, 9, 24)).sum().backward()
    assert conv.conv_weight.grad.view(4, 24).abs().amax(dim=1).min() > 0  # every tap learns


def test_bad_input_and_cache_raise():
    pom = PoM(16, 2, 1)
    with pytest.raises(MuonGPTError, match="width 16"):
        pom(torch.randn(1, 4, 12))
    with pytest.raises(MuonGPTError, match="cache"):
        pom(torch.randn(2, 1, 16), cache=pom.new_cache(3))
    with pytest.raises(MuonGPTError, match="cache tail"):
        PoM(16, 2, 1, conv=3)(torch.randn(2, 1, 16), cache=pom.new_cache(2))


# --- whole model ------------------------------------------------------------------------------


def _gpt(pattern: list[str], conv: int = 0):
    from muongpt.model.gpt import GPT, GPTConfig, MixingConfig

    torch.manual_seed(0)
    mixing = MixingConfig(pattern, pom_conv=conv)
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, mixing=mixing)
    model = GPT(config)
    # Output projections start at zero, which would make any model trivially causal.
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.normal_(std=1 / math.sqrt(p.size(-1)))
        for b in model.blocks:  # and a convolution that is not the identity
            if getattr(b.mixer, "conv_weight", None) is not None:
                b.mixer.conv_weight.normal_()
    return model


@pytest.mark.parametrize("pattern,conv", [(["pom"], 0), (["pom", "attention"], 0), (["pom"], 4)])
def test_whole_model_is_causal(pattern, conv):
    model = _gpt(pattern, conv)
    assert any(type(b.mixer).__name__ == "PoM" for b in model.blocks)
    idx = torch.randint(0, 97, (2, 24))
    t = 10
    idx2 = idx.clone()
    idx2[:, t + 1 :] = (idx[:, t + 1 :] + 1 + torch.randint(0, 90, (2, 24 - t - 1))) % 97
    with torch.no_grad():
        logits, logits2 = model(idx), model(idx2)
    torch.testing.assert_close(logits[:, : t + 1], logits2[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits[:, t + 1 :], logits2[:, t + 1 :])


@pytest.mark.parametrize("pattern,conv", [(["pom"], 0), (["pom", "attention"], 4)])
def test_whole_model_incremental_decoding(pattern, conv):
    model = _gpt(pattern, conv)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(idx)
        caches = model.new_caches(2, 16)
        steps = [model(idx[:, :5], caches=caches)]
        steps += [model(idx[:, i : i + 1], caches=caches) for i in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
