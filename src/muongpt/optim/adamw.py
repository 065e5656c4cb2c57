"""torch's AdamW with its large tensors stepped by the Triton kernel of ``kernels/adamw.py``.

The same options and the same state as ``torch.optim.AdamW`` (``step``, ``exp_avg``,
``exp_avg_sq`` per parameter; the step count a host tensor, as in torch's non-fused AdamW), so
checkpoints move between the two. Tensors of at least ``KERNEL_MIN_NUMEL`` elements take one
kernel launch each; the rest (the scalar group's gains, small gates) take torch's multi-tensor
step, where one launch covers many of them.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from muongpt.kernels.adamw import adamw_step_, kernel_usable
from muongpt.optim.config import OptimizerError
from muongpt.optim.muon import run_closure

KERNEL_MIN_NUMEL = 1 << 20  # below this a launch of its own costs more than the step saves


class KernelAdamW(torch.optim.AdamW):
    state_kind = "AdamW"  # what a checkpoint records: torch's AdamW state

    def __init__(self, params, **options):
        unsupported = [
            k
            for k in ("amsgrad", "maximize", "capturable", "fused", "differentiable")
            if options.get(k)
        ]
        if unsupported:
            raise OptimizerError(f"KernelAdamW: unsupported option(s) {unsupported}")
        super().__init__(params, **{**options, "foreach": True, "fused": None})

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            hyper = dict(
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
            small: tuple[list, list, list, list, list] = ([], [], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError("KernelAdamW: sparse gradients are not supported")
                state = self._state_of(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.numel() >= KERNEL_MIN_NUMEL and kernel_usable(p, p.grad, m, v):
                    state["step"] += 1
                    adamw_step_(p, p.grad, m, v, step=int(state["step"].item()), **hyper)
                else:
                    for bucket, t in zip(small, (p, p.grad, m, v, state["step"])):
                        bucket.append(t)
            if small[0]:
                adamw(
                    *small[:4], [], small[4], foreach=True, amsgrad=False, maximize=False, **hyper
                )
        return loss

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, made as torch's AdamW makes it; a step count kept on the
        device (a fused AdamW's checkpoint) comes to the host once."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device.type != "cpu":
            state["step"] = state["step"].to("cpu", torch.float32)
        return state
