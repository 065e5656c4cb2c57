"""AdamW's Triton step (kernels/adamw.py) and the AdamW that uses it (optim/adamw.py), against
torch's fused AdamW: the same math, one rounding per stored tensor."""

from __future__ import annotations

import copy

import pytest
import torch

from kernel_marks import needs_gpu, needs_interpreter
from muongpt.kernels import adamw as kernel
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.optim.adamw import KERNEL_MIN_NUMEL, KernelAdamW
from muongpt.optim.combined import build_optimizer, optimizer_kind
from muongpt.optim.config import MuonConfig
from test_speedrun import speedrun

HYPER = dict(lr=0.02, betas=(0.5, 0.95), eps=1e-10, weight_decay=0.1)


def torch_fused_steps(p0: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], **HYPER, fused=True)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


def our_steps(p0: torch.Tensor, grads: list[torch.Tensor], step_fn) -> tuple[torch.Tensor, ...]:
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    b1, b2 = HYPER["betas"]
    for t, g in enumerate(grads, start=1):
        step_fn(p, g, m, v, lr=HYPER["lr"], beta1=b1, beta2=b2, eps=HYPER["eps"],
                weight_decay=HYPER["weight_decay"], step=t)  # fmt: skip
    return p, m, v


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to rounding: fp32 to a few ulps; bf16 to one ulp of the value (the two round
    the same fp32 result, computed in a different order, once)."""
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)


def data(n: int, dtype: torch.dtype, steps: int = 4):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen).to(dtype)
    grads = [(torch.randn(n, generator=gen) * (0.1 + t)).to(dtype) for t in range(steps)]
    return p0, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_form_equals_torch_fused_adamw(dtype):
    p0, grads = data(3000, dtype)
    want_p, want = torch_fused_steps(p0, grads)
    p, m, v = our_steps(p0, grads, kernel.adamw_step_torch)
    close(p, want_p, dtype)
    close(m, want["exp_avg"], dtype)
    close(v, want["exp_avg_sq"], dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype, steps", [(torch.float32, 4), (torch.bfloat16, 1)])
def test_kernel_equals_torch_fused_adamw(dtype, steps):
    """Over a size that is not a multiple of the kernel's block (the masked tail). bf16 for one
    step only: the interpreter truncates fp32 to bf16 where the GPU rounds to nearest, so its
    one-ulp differences would compound (the GPU test below steps bf16 three times)."""
    p0, grads = data(2 * kernel.BLOCK + 77, dtype, steps)
    assert kernel.kernel_usable(p0, *grads[:1], p0, p0)
    want_p, want = torch_fused_steps(p0, grads)
    p, m, v = our_steps(p0, grads, kernel.adamw_step_)
    assert not kernel.FAILED
    close(p, want_p, dtype)
    close(m, want["exp_avg"], dtype)
    close(v, want["exp_avg_sq"], dtype)


def test_kernel_refuses_what_it_cannot_step():
    x = torch.zeros(8, 8)
    assert not kernel.kernel_usable(x.t(), x, x, x) or not x.t().is_contiguous()
    assert not kernel.kernel_usable(x, x[:4], x, x)
    assert not kernel.kernel_usable(x, x.long(), x, x)


def step_alike(pairs: list, optimizers, gen: torch.Generator) -> None:
    """The same random gradient on both parameters of each pair, then a step of each optimizer."""
    for a, b in pairs:
        g = torch.randn(a.shape, generator=gen, device=gen.device).to(a.dtype)
        a.grad, b.grad = g.clone(), g.clone()
    for opt in optimizers:
        opt.step()


def model_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(KERNEL_MIN_NUMEL + 5, generator=gen)
    return [big, torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]


@needs_interpreter
def test_kernel_adamw_steps_as_torch_fused_adamw_and_shares_its_state():
    """A large table (the kernel) and small tensors (torch's multi-tensor step) in two groups,
    four steps, then the state loaded into torch's AdamW, which goes on as ours does."""
    start = model_params()
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}]  # noqa: E731
    opt = KernelAdamW(groups(ours), **HYPER)
    ref = torch.optim.AdamW(groups(theirs), **HYPER, fused=True)
    assert optimizer_kind(opt) == optimizer_kind(ref) == "AdamW"
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        step_alike(list(zip(ours, theirs)), (opt, ref), gen)
    for a, b in zip(ours, theirs):
        close(a.detach(), b.detach(), a.dtype)
        assert float(opt.state[a]["step"]) == 4

    resumed = [torch.nn.Parameter(a.detach().clone()) for a in ours]
    again = torch.optim.AdamW(groups(resumed), **HYPER)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared moments
    step_alike(list(zip(ours, resumed)), (opt, again), gen)
    for a, b in zip(ours, resumed):
        close(a.detach(), b.detach(), a.dtype)


def test_kernel_adamw_refuses_options_it_does_not_implement():
    p = torch.nn.Parameter(torch.zeros(3))
    for option in ("amsgrad", "maximize", "capturable"):
        with pytest.raises(ValueError, match=option):
            KernelAdamW([p], **{option: True})


@needs_gpu
def test_adamw_kernel_option_steps_the_speedrun_parameters_as_fused_adamw(monkeypatch):
    """``optimizer.adamw_kernel=true`` on CUDA: the side groups' AdamW is KernelAdamW, and three
    steps of the bf16 tables and fp32 side parameters (every one through the kernel here) equal
    torch's fused AdamW's, up to what the bf16 moments' rounding lets through (below)."""
    monkeypatch.setattr("muongpt.optim.adamw.KERNEL_MIN_NUMEL", 1)
    tables = KernelsConfig(converters=["bf16_tables"])
    models = [apply_converters(speedrun(), tables).cuda() for _ in range(2)]
    opts = [build_optimizer(m, MuonConfig(adamw_kernel=k)) for m, k in zip(models, (True, False))]
    assert any(isinstance(o, KernelAdamW) for o in opts[0].optimizers)
    assert not any(isinstance(o, KernelAdamW) for o in opts[1].optimizers)
    assert any(p.dtype == torch.bfloat16 for p in models[0].parameters())
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        step_alike(list(zip(models[0].parameters(), models[1].parameters())), opts, gen)
    lr_of = {p: g["lr"] for o in opts[1].optimizers for g in o.param_groups for p in g["params"]}
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        if a.dtype != torch.bfloat16:
            close(a.detach(), b.detach(), a.dtype)
            continue
        # a bf16 moment rounded the other way (its fp32 value computed in another order: about
        # 0.1% of elements per step) moves each later update by up to lr * 2^-8, more than a bf16
        # ulp of p near 0 at the tables' lr (2.9 here): one ulp of p plus that, twice
        slack = 2 * lr_of[b] * 2**-8
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2**-7, atol=slack)
