"""Muon: a step equals a plain float64 loop, one batched call per shape, one fp32 buffer each."""

import io
import math

import pytest
import torch

from muongpt import MuonGPTError
from muongpt.optim import Muon
from muongpt.optim import muon as muon_module

# The reference's coefficients, written out (not imported: a wrong value in the module must not
# move the reference with it). Classic: Jordan et al. 2024. Polar Express: Amsel et al. 2025,
# optimal_composition(l=1e-3, num_iters=5, safety_factor_eps=2e-2, cushion=0.02).
CLASSIC_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02

SHAPES = [(8, 16), (8, 16), (16, 8), (12, 12), (4, 3, 5)]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def make_grads(step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in SHAPES]


def reference_orthogonalize(M, coefficients):
    """Newton-Schulz for one matrix, float64, written out."""
    if coefficients == "classic":
        table, safety = [CLASSIC_COEFFICIENTS] * 5, 1.0
    else:
        table, safety = POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY
    tall = M.shape[0] > M.shape[1]
    X = M.T if tall else M
    X = X / (math.sqrt((X * X).sum().item()) * safety + 1e-7)
    for a, b, c in table:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if tall else X


def reference_muon(
    params,
    grads_per_step,
    lr,
    momentum,
    nesterov,
    wd,
    coefficients,
    scale_mode,
    normuon=False,
    beta2=0.95,
    cautious=False,
):
    """Plain loop over parameters, steps and neurons, all float64."""
    weights = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in weights]
    second = [None] * len(weights)
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(weights, grads)):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * bufs[i] if nesterov else bufs[i]
            rows, cols = w.shape[0], w.numel() // w.shape[0]
            o = reference_orthogonalize(u.reshape(rows, cols), coefficients)
            if normuon:
                # one neuron per row, or per column where there are more columns than rows
                neurons = o if rows >= cols else o.T
                mean_sq = torch.stack([(n * n).mean() for n in neurons])
                second[i] = mean_sq * (1 - beta2) + (0 if second[i] is None else beta2 * second[i])
                normed = torch.stack([n / second[i][k].sqrt() for k, n in enumerate(neurons)])
                normed = normed * (neurons.norm() / normed.norm())
                o = normed if rows >= cols else normed.T
            o = o.reshape(w.shape)
            if scale_mode == "spectral":
                scale = max(1.0, rows / cols) ** 0.5
            else:
                scale = 0.2 * max(rows, cols) ** 0.5
            decay = lr * wd * w
            if cautious:  # only where the step (-lr * scale * o) already shrinks |w|
                decay = torch.where(w * o > 0, decay, torch.zeros_like(w))
            weights[i] = w - decay - lr * scale * o
    return weights


@pytest.mark.parametrize(
    "nesterov,wd,coefficients,scale_mode,normuon,cautious",
    [
        (True, 0.0, "polar_express", "spectral", False, False),
        (False, 0.1, "classic", "match_adamw", False, False),
        (True, 0.05, "classic", "spectral", False, False),
        (True, 0.0, "polar_express", "spectral", True, False),
        (True, 0.3, "polar_express", "match_adamw", True, True),
        (False, 0.3, "classic", "spectral", False, True),
    ],
)
def test_steps_equal_float64_reference(nesterov, wd, coefficients, scale_mode, normuon, cautious):
    params = make_params()
    grads_per_step = [make_grads(s) for s in range(3)]
    expected = reference_muon(
        params,
        grads_per_step,
        0.02,
        0.9,
        nesterov,
        wd,
        coefficients,
        scale_mode,
        normuon=normuon,
        beta2=0.8,
        cautious=cautious,
    )
    opt = Muon(
        params,
        lr=0.02,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=wd,
        ns_coefficients=coefficients,
        scale_mode=scale_mode,
        normuon=normuon,
        normuon_beta2=0.8,
        cautious_wd=cautious,
        ns_dtype=torch.float64,
    )
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_normuon_equalizes_neurons_and_keeps_the_update_norm(shape):
    """beta2 = 0: every neuron (the longer side's rows or columns) moves by the same RMS, and
    the matrix's update has the plain Muon update's Frobenius norm. A gradient with one huge
    neuron shows the difference: plain Muon leaves its neurons unequal."""
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad[:, :1] *= 50  # one dominant input direction
    grad[:1] *= 50
    deltas = {}
    for normuon in (False, True):
        w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        w.grad = grad.clone()
        Muon(
            [w],
            lr=1.0,
            momentum=0.0,
            nesterov=False,
            normuon=normuon,
            normuon_beta2=0.0,
            ns_dtype=torch.float64,
        ).step()
        deltas[normuon] = -w.detach()
    neurons = {k: (d if shape[0] >= shape[1] else d.T) for k, d in deltas.items()}
    rms = {k: n.square().mean(dim=1).sqrt() for k, n in neurons.items()}
    assert rms[False].max() / rms[False].min() > 1.5  # the test has something to fix
    torch.testing.assert_close(rms[True], rms[True].mean().expand_as(rms[True]))
    torch.testing.assert_close(deltas[True].norm(), deltas[False].norm())
    state = Muon([w], normuon=True).state  # fresh: no state before a step
    assert not state


def test_bf16_orthogonalization_close_to_reference():
    params = make_params(torch.float32)
    start = [p.detach().double() for p in params]
    grads = make_grads(0, torch.float32)
    expected = reference_muon(
        [p.double() for p in params],
        [[g.double() for g in grads]],
        0.02,
        0.95,
        True,
        0.0,
        "polar_express",
        "spectral",
    )
    opt = Muon(params, lr=0.02)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, s, e in zip(params, start, expected):
        got, want = p.detach().double() - s, e - s
        cosine = (got * want).sum() / (got.norm() * want.norm())
        assert cosine > 0.99


def test_one_batched_call_per_wide_shape(monkeypatch):
    calls = []
    real = muon_module.newton_schulz

    def counting(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz", counting)
    params = make_params(torch.float32)
    opt = Muon(params, lr=0.02)
    for p, g in zip(params, make_grads(0, torch.float32)):
        p.grad = g
    opt.step()
    # (8, 16) twice and (16, 8) transposed -> one call of batch 3; the 3-D parameter flattened
    assert sorted(calls) == sorted([(3, 8, 16), (1, 12, 12), (1, 4, 15)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_one_fp32_buffer_per_matrix(dtype):
    params = make_params(dtype)
    opt = Muon(params, lr=0.02)
    for p, g in zip(params, make_grads(0, dtype)):
        p.grad = g
    opt.step()
    assert len(opt.state) == len(params)
    for p in params:
        state = opt.state[p]
        assert list(state) == ["momentum_buffer"]
        assert state["momentum_buffer"].dtype == torch.float32
        assert state["momentum_buffer"].shape == p.shape
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert state_bytes == 4 * sum(p.numel() for p in params)


@pytest.mark.parametrize(
    "options", [{}, {"normuon": True, "weight_decay": 0.1, "cautious_wd": True}]
)
def test_state_dict_roundtrip_bit_identical_with_bf16_params(options):
    params = make_params(torch.bfloat16)
    opt = Muon(params, lr=0.02, **options)
    for step in range(2):
        for p, g in zip(params, make_grads(step, torch.bfloat16)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    clones = [p.detach().clone().requires_grad_() for p in params]
    resumed = Muon(clones, lr=0.02, **options)
    resumed.load_state_dict(saved)
    for p in clones:  # torch would cast state to bf16; Muon keeps the fp32 buffers
        assert all(v.dtype == torch.float32 for v in resumed.state[p].values())
        assert ("second_moment" in resumed.state[p]) == bool(options)
    grads = make_grads(2, torch.bfloat16)
    for group in (params, clones):
        for p, g in zip(group, grads):
            p.grad = g.clone()
    opt.step()
    resumed.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_loads_state_saved_before_normuon_existed():
    """Groups saved without the newer options get their defaults instead of a KeyError."""
    params = make_params(torch.float32)
    opt = Muon(params, lr=0.02)
    for p, g in zip(params, make_grads(0, torch.float32)):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in ("normuon", "normuon_beta2", "cautious_wd"):
            del group[key]
    resumed = Muon([p.detach().clone().requires_grad_() for p in params], lr=0.02)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["normuon"] is False
    for p, g in zip(resumed.param_groups[0]["params"], make_grads(1, torch.float32)):
        p.grad = g
    resumed.step()


def test_skips_params_without_grad():
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.02)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(params[0], before[0])
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p, b)
    assert len(opt.state) == 1


def test_bad_input():
    w = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(MuonGPTError, match="empty parameter list"):
        Muon([])
    with pytest.raises(MuonGPTError, match="lr"):
        Muon([w], lr=0.0)
    with pytest.raises(MuonGPTError, match="lr"):
        Muon([w], lr=-1e-3)
    with pytest.raises(MuonGPTError, match="momentum"):
        Muon([w], momentum=1.0)
    with pytest.raises(MuonGPTError, match="scale_mode"):
        Muon([w], scale_mode="huge")
    with pytest.raises(MuonGPTError, match="coefficients"):
        Muon([w], ns_coefficients="cubic")
    gain = torch.ones(4, requires_grad=True)
    with pytest.raises(MuonGPTError, match="blocks.0.norm.weight"):
        Muon([("blocks.0.mlp.fc.weight", w), ("blocks.0.norm.weight", gain)])
    with pytest.raises(MuonGPTError, match=r"param_groups\[0\]\[0\]"):
        Muon([torch.tensor(1.0, requires_grad=True)])
    with pytest.raises(ValueError):  # OptimizerError is a ValueError too
        Muon([gain])
