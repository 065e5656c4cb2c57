"""Lookup tables stored in bf16, with their gradients summed in fp32.

For a table W (V, D) in bf16 and token ids i (N,), the lookup and its gradient are

    y_n    = W[i_n]                                        # bf16, as autocast uses it anyway
    dW_v   = bf16( sum_{n : i_n = v} fp32(dy_n) )          # summed in fp32, rounded once

A frequent token's row sums thousands of terms: summed in bf16 (what eager PyTorch's CPU
embedding backward does for a bf16 table) the sum stops growing once a term falls below half an
ulp of it (10,000 terms of 0.001 sum to 0.5, not 10). AdamW then keeps its moments in the
table's dtype, so the table's gradient, moments and step move half the bytes of fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = weight.size(0)
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.size(-1)).float()
        total = flat.new_zeros(ctx.rows, flat.size(-1))
        total.index_add_(0, idx.reshape(-1), flat)
        return None, total.to(torch.bfloat16)


class BF16Table(nn.Module):
    """Stands in for an ``nn.Embedding``: its Parameter, converted to bf16 in place, looked up
    with the fp32-summed gradient above."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.weight = table.weight
        self.weight.data = self.weight.data.to(torch.bfloat16)

    def forward(self, idx: Tensor) -> Tensor:
        return _Lookup.apply(idx, self.weight)
