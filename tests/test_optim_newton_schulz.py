"""newton_schulz: the contract of issue 3 on the d12 shapes, and exactness of the iteration."""

from math import sqrt

import numpy as np
import pytest
import torch

from muongpt import MuonGPTError
from muongpt.optim import newton_schulz
from muongpt.optim.newton_schulz import (
    CLASSIC_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    POLAR_EXPRESS_LIMIT,
    POLAR_EXPRESS_SAFETY,
)

SV_RANGE = {"classic": (0.6, 1.25), "polar_express": (0.8, 1.2)}
MIN_COSINE = {"classic": 0.97, "polar_express": 0.99}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (2304, 768)])
def test_singular_values_in_range_on_d12_shapes(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for coefficients, (low, high) in SV_RANGE.items():
        out = newton_schulz(G, steps=5, coefficients=coefficients)
        assert out.shape == G.shape and out.dtype == G.dtype
        tall = (
            out.float() if out.shape[0] >= out.shape[1] else out.float().T
        )  # same values, faster SVD
        s = torch.linalg.svdvals(tall)
        assert low <= s.min().item() and s.max().item() <= high, (coefficients, s.min(), s.max())


def test_cosine_with_exact_polar_factor_768():
    G = torch.randn(768, 768, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G)
    polar = U @ Vh
    for coefficients, minimum in MIN_COSINE.items():
        out = newton_schulz(G.float(), steps=5, coefficients=coefficients).double()
        cosine = (out * polar).sum() / (out.norm() * polar.norm())
        assert cosine >= minimum, (coefficients, cosine.item())


def quintic_reference(G: torch.Tensor, table, safety: float) -> torch.Tensor:
    """The iteration written out for one matrix, wide orientation, float64."""
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (torch.linalg.matrix_norm(X) * safety + 1e-7)
    for a, b, c in table:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ A @ X)
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("coefficients", ["classic", "polar_express"])
def test_batched_float64_matches_per_matrix_reference(coefficients):
    gen = torch.Generator().manual_seed(2)
    for shape in [(4, 24, 40), (3, 40, 24), (2, 3, 16, 16)]:
        G = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out = newton_schulz(G, steps=7, coefficients=coefficients, dtype=torch.float64)
        if coefficients == "classic":
            table, safety = [CLASSIC_COEFFICIENTS] * 7, 1.0
        else:  # five fitted steps, then the limit polynomial
            table = list(POLAR_EXPRESS_COEFFICIENTS) + [POLAR_EXPRESS_LIMIT] * 2
            safety = POLAR_EXPRESS_SAFETY
        flat_G, flat_O = G.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])
        for g, o in zip(flat_G, flat_O):
            torch.testing.assert_close(
                o, quintic_reference(g, table, safety), rtol=1e-12, atol=1e-12
            )


def test_bf16_close_to_float64_run():
    G = torch.randn(5, 64, 128, generator=torch.Generator().manual_seed(3))
    fast = newton_schulz(G, coefficients="polar_express")
    exact = newton_schulz(G.double(), coefficients="polar_express", dtype=torch.float64)
    assert (fast.double() - exact).norm() / exact.norm() < 0.05  # bf16: ~2% after 15 matmuls


def _odd_quintic_minimax(low: float, high: float) -> tuple[float, float, float]:
    """Odd quintic p best approximating 1 on [low, high]: equioscillation at four points."""
    if low / high > 1 - 5e-6:
        return 15 / 8 / high, -10 / 8 / high**3, 3 / 8 / high**5
    x1, x2 = (3 * low + high) / 4, (low + 3 * high) / 4
    error = None
    while True:
        points = np.array([low, x1, x2, high])
        signs = np.array([1.0, -1.0, 1.0, -1.0])
        M = np.stack([points, points**3, points**5, signs], axis=1)
        a, b, c, new_error = np.linalg.solve(M, np.ones(4))
        # interior extrema of p: roots of a + 3b x^2 + 5c x^4
        disc = sqrt(9 * b * b - 20 * a * c)
        x1, x2 = np.sqrt((-3 * b - disc) / (10 * c)), np.sqrt((-3 * b + disc) / (10 * c))
        if error is not None and abs(new_error - error) <= 1e-15:
            return float(a), float(b), float(c)
        error = new_error


def test_polar_express_coefficients_are_the_papers_construction():
    """Amsel et al. 2025: l=1e-3, 5 iterations, cushion 0.02, safety 1 + 2e-2 (not the last)."""
    low, high, cushion, safety = 1e-3, 1.0, 0.02, POLAR_EXPRESS_SAFETY
    for i, published in enumerate(POLAR_EXPRESS_COEFFICIENTS):
        a, b, c = _odd_quintic_minimax(max(low, cushion * high), high)
        if cushion * high > low:  # recentre so that p(low) and p(high) straddle 1 symmetrically
            p_low, p_high = (a * x + b * x**3 + c * x**5 for x in (low, high))
            a, b, c = (v * 2 / (p_low + p_high) for v in (a, b, c))
        if i < len(POLAR_EXPRESS_COEFFICIENTS) - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        np.testing.assert_allclose((a, b, c), published, rtol=1e-9)
        low = a * low + b * low**3 + c * low**5
        high = 2 - low


def test_bad_input():
    with pytest.raises(MuonGPTError, match="matrix"):
        newton_schulz(torch.randn(8))
    with pytest.raises(MuonGPTError, match="coefficients"):
        newton_schulz(torch.randn(4, 4), coefficients="cubic")
    with pytest.raises(MuonGPTError, match="steps"):
        newton_schulz(torch.randn(4, 4), steps=0)
