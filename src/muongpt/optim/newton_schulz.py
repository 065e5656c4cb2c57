"""Newton-Schulz orthogonalization: the approximate polar factor U V^T of G = U S V^T.

Each step applies the odd quintic p(x) = a x + b x^3 + c x^5 to the singular values:

    A = X X^T,   X <- a X + (b A + c A^2) X

after X = G / ||G||_F has put every singular value in (0, 1]. Two coefficient sets:

- "classic" (Jordan et al. 2024): (3.4445, -4.7750, 2.0315) every step. It does not converge to 1:
  singular values end up oscillating in roughly [0.7, 1.2], which Muon tolerates.
- "polar_express" (Amsel et al. 2025, arXiv:2505.16932): a different minimax-optimal quintic per
  step. The five below are the paper's ``optimal_composition(l=1e-3, num_iters=5,
  safety_factor_eps=2e-2, cushion=0.02)``, the set modded-nanogpt runs; the input is divided by
  1.02 * ||G||_F to match that safety factor, so bf16 rounding cannot push a singular value past
  the interval the polynomials were fitted on. Steps past five use the limit polynomial
  (15/8, -10/8, 3/8), which is what the construction converges to once the interval is ~[1, 1].

A and B are symmetric: on CUDA ``muongpt.kernels.newton_schulz.symmetric_gram`` computes each
from the tiles of one triangle (half their flops); elsewhere they are torch.bmm / baddbmm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muongpt.kernels.newton_schulz import kernel_usable, poly_times, symmetric_gram
from muongpt.optim.config import OptimizerError

CLASSIC_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_LIMIT = (15 / 8, -10 / 8, 3 / 8)
POLAR_EXPRESS_SAFETY = 1.02
COEFFICIENT_SETS = ("classic", "polar_express")


def coefficient_schedule(coefficients: str, steps: int) -> tuple[list[tuple], float]:
    """The (a, b, c) of each step and the factor on ||G||_F used to normalise the input."""
    if coefficients == "classic":
        return [CLASSIC_COEFFICIENTS] * steps, 1.0
    if coefficients == "polar_express":
        table = list(POLAR_EXPRESS_COEFFICIENTS[:steps])
        table += [POLAR_EXPRESS_LIMIT] * (steps - len(table))
        return table, POLAR_EXPRESS_SAFETY
    raise OptimizerError(f"coefficients must be one of {COEFFICIENT_SETS}, got {coefficients!r}")


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str = "classic",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Orthogonalize G (m, n) or a batch (..., m, n); returns G's shape and dtype.

    Runs in ``dtype`` (bf16: the matmuls are the whole cost). Works on the wide orientation
    (m <= n) so the Gram matrix A = X X^T is the small side; a wide, contiguous G in ``dtype``
    is used as it is (no copy).
    """
    if G.ndim < 2:
        raise OptimizerError(f"newton_schulz needs a matrix or a batch of matrices, got {G.shape}")
    if steps < 1:
        raise OptimizerError(f"ns steps must be >= 1, got {steps}")
    table, safety = coefficient_schedule(coefficients, steps)
    batch_shape = G.shape[:-2]
    X = G.reshape(-1, G.size(-2), G.size(-1))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X.to(dtype, memory_format=torch.contiguous_format)  # one copy, cast and wide in memory
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm * safety + eps)
    triangle = X.is_cuda and kernel_usable(X)
    for a, b, c in table:
        if triangle:
            A = symmetric_gram(X)  # X X^T
            B = symmetric_gram(A, A, alpha=c, beta=b)  # b A + c A A^T (= c A^2: A is symmetric)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = poly_times(B, X, a) if triangle else torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X.reshape(*batch_shape, G.size(-2), G.size(-1)).to(G.dtype)
