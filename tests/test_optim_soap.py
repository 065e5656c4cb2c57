"""SOAP against a straightforward float64 reference: 12 steps with basis refreshes."""

import copy
import io

import pytest
import torch

from muongpt import MuonGPTError
from muongpt.optim import SOAP
from muongpt.optim.soap import cholesky_qr, merged_shape

pytestmark = pytest.mark.usefixtures("single_thread")


def eigh_descending(S):
    _, Q = torch.linalg.eigh(S)
    return Q.flip(1)


class ReferenceMatrixSOAP:
    """SOAP for one matrix W (m, n), as in the paper: M in the original space, V in the eigenbasis.

    ``left`` / ``right``: whether that side is rotated (a side larger than max_precond_dim, or the
    1 x 1 side of a vector, is not).
    """

    def __init__(self, W, left, right, lr, betas, shampoo_beta, eps, wd, freq, normalize, bias):
        self.W = W.clone()
        self.left, self.right = left, right
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.s = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.freq, self.normalize, self.bias = freq, normalize, bias
        self.t = None

    def to_eigen(self, X):
        if self.left:
            X = self.QL.T @ X
        return X @ self.QR if self.right else X

    def from_eigen(self, X):
        if self.left:
            X = self.QL @ X
        return X @ self.QR.T if self.right else X

    def accumulate(self, G):
        if self.left:
            self.L = self.s * self.L + (1 - self.s) * (G @ G.T)
        if self.right:
            self.R = self.s * self.R + (1 - self.s) * (G.T @ G)

    def step(self, G):
        if self.t is None:  # first step: statistics and eigenbasis only
            m, n = G.shape
            self.L, self.R = torch.zeros(m, m, dtype=G.dtype), torch.zeros(n, n, dtype=G.dtype)
            self.accumulate(G)
            self.QL, self.QR = eigh_descending(self.L), eigh_descending(self.R)
            self.M, self.V, self.t = torch.zeros_like(G), torch.zeros_like(G), 0
            return
        self.t += 1
        G_rot = self.to_eigen(G)
        self.M = self.b1 * self.M + (1 - self.b1) * G
        self.V = self.b2 * self.V + (1 - self.b2) * G_rot**2
        U = self.from_eigen(self.to_eigen(self.M) / (self.V.sqrt() + self.eps))
        if self.normalize:
            U = U / (1e-30 + U.pow(2).mean().sqrt())
        step_size = self.lr
        if self.bias:
            step_size *= (1 - self.b2**self.t) ** 0.5 / (1 - self.b1**self.t)
        self.W = self.W - step_size * U
        self.W = self.W - self.lr * self.wd * self.W
        self.accumulate(G)
        if self.t % self.freq == 0:  # power iteration + QR, V permuted with the columns
            if self.left:
                order = torch.argsort(torch.diag(self.QL.T @ self.L @ self.QL), descending=True)
                self.V = self.V[order, :]
                self.QL = torch.linalg.qr(self.L @ self.QL[:, order]).Q
            if self.right:
                order = torch.argsort(torch.diag(self.QR.T @ self.R @ self.QR), descending=True)
                self.V = self.V[:, order]
                self.QR = torch.linalg.qr(self.R @ self.QR[:, order]).Q


# Each case: shape, group options, and how the reference sees it:
# (to_matrix, from_matrix, left, right). The first basis is eigh of a statistic of rank
# min(rows, cols): each side's null space is kept to at most one dim, where the eigenvector is
# unique up to its sign (which SOAP does not see); a larger one has no unique basis to compare.
CASES = [
    ((6, 5), {}, (lambda x: x, lambda x: x, True, True)),
    ((5, 12), {"max_precond_dim": 8}, (lambda x: x, lambda x: x, True, False)),
    # a vector's statistic g g^T gains one rank per step: keep it short enough to be full rank
    # by the first refresh (power iteration + QR of a singular statistic is ill-posed)
    ((3,), {"precondition_1d": True}, (lambda x: x[:, None], lambda x: x[:, 0], True, False)),
    ((7,), {}, (lambda x: x[:, None], lambda x: x[:, 0], False, False)),  # plain Adam
    (
        (2, 2, 5),
        {"merge_dims": True, "max_precond_dim": 8, "normalize_grads": True},
        (lambda x: x.reshape(4, 5), lambda x: x.reshape(2, 2, 5), True, True),
    ),
    (
        (2, 2, 3, 3),  # channels_last (N, H, W, C): merged as (N*C, H*W) = (6, 6)
        {"merge_dims": True, "max_precond_dim": 8, "data_format": "channels_last"},
        (
            lambda x: x.permute(0, 3, 1, 2).reshape(6, 6),
            lambda x: x.reshape(2, 3, 2, 3).permute(0, 2, 3, 1),
            True,
            True,
        ),
    ),
    ((4, 6), {"correct_bias": False, "shampoo_beta": 0.8, "weight_decay": 0.0}, None),
]


def test_twelve_steps_equal_float64_reference():
    gen = torch.Generator().manual_seed(0)
    defaults = dict(
        lr=0.01,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.05,
        precondition_frequency=3,
        one_sided=False,
    )
    params, groups, references = [], [], []
    for shape, options, view in CASES:
        p = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
        params.append(p)
        groups.append({"params": [p], **options})
        o = {**defaults, "shampoo_beta": -1, "normalize_grads": False, "correct_bias": True}
        o.update({k: v for k, v in options.items() if k in o})
        to_m, from_m, left, right = view or (lambda x: x, lambda x: x, True, True)
        ref = ReferenceMatrixSOAP(
            to_m(p.detach()),
            left,
            right,
            o["lr"],
            o["betas"],
            o["shampoo_beta"],
            o["eps"],
            o["weight_decay"],
            o["precondition_frequency"],
            o["normalize_grads"],
            o["correct_bias"],
        )
        references.append((ref, to_m, from_m))
    opt = SOAP(groups, **defaults)

    initial = [p.detach().clone() for p in params]
    for step in range(12):
        for p, (ref, to_m, _) in zip(params, references):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g
            ref.step(to_m(g))
        opt.step()
        if step == 0:  # the first step only initialises
            for p, p0 in zip(params, initial):
                assert torch.equal(p, p0)
            assert all(opt.state[p]["step"] == 0 for p in params)
        for p, (ref, _, from_m) in zip(params, references):
            torch.testing.assert_close(p.detach(), from_m(ref.W), rtol=1e-9, atol=1e-11)
    # refreshes happened (steps 3, 6, 9, 12) and the parameters moved
    assert all(opt.state[p]["step"] == 11 for p in params)
    for p, p0 in zip(params, initial):
        assert (p - p0).abs().max() > 1e-3


def test_merged_shape():
    assert merged_shape((2, 3, 4), 8) == (6, 4)
    assert merged_shape((3, 20, 2), 8) == (3, 20, 2)
    assert merged_shape((1, 1), 8) == (1,)
    assert merged_shape((4, 2, 3, 3), 10) == (8, 9)


def test_state_dict_roundtrip_bit_identical_bf16():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(6, 5, generator=gen).bfloat16().requires_grad_() for _ in range(2)]
    opt = SOAP(params, precondition_frequency=2)
    grads = [[torch.randn(6, 5, generator=gen).bfloat16() for _ in params] for _ in range(5)]
    for step_grads in grads[:4]:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [p.detach().clone().requires_grad_() for p in params]
    resumed = SOAP(clones, precondition_frequency=2)
    resumed.load_state_dict(saved)
    (Q,) = [q for q in resumed.state[clones[0]]["Q"] if q is not None]
    assert Q.dtype == torch.float32  # not cast to bf16
    for group in (params, clones):
        for p, g in zip(group, grads[4]):
            p.grad = g.clone()
    opt.step()
    resumed.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_bad_input():
    w = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(MuonGPTError, match="empty parameter list"):
        SOAP([])
    with pytest.raises(MuonGPTError, match="lr"):
        SOAP([w], lr=0)
    with pytest.raises(MuonGPTError, match=r"betas\[0\]"):
        SOAP([w], betas=(1.0, 0.9))
    with pytest.raises(MuonGPTError, match=r"betas\[1\]"):
        SOAP([w], betas=(0.9, -0.1))
    with pytest.raises(MuonGPTError, match="shampoo_beta"):
        SOAP([w], shampoo_beta=1.5)
    with pytest.raises(MuonGPTError, match="data_format"):
        SOAP([w], data_format="nhwc")
    with pytest.raises(MuonGPTError, match="precondition_frequency"):
        SOAP([w], precondition_frequency=0)


def run_against_reference(shapes, options, dtype=torch.float64, steps=12):
    """SOAP over same-shape stacks in one group against one float64 reference per matrix;
    returns the largest difference of any weight at any step."""
    gen = torch.Generator().manual_seed(3)
    hyper = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, precondition_frequency=3)
    options = {"one_sided": False, **options}  # the reference's two-sided SOAP unless asked
    params = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    refs = []
    for p in params:
        m, n = p.shape
        left, right = (m < n, m >= n) if options.get("one_sided") else (True, True)
        refs.append(ReferenceMatrixSOAP(p, left, right, 0.01, (0.9, 0.95), -1, 1e-8, 0.05, 3, 0, 1))
    params = [p.to(dtype).requires_grad_() for p in params]
    opt = SOAP([{"params": params, **options}], **hyper)
    worst = 0.0
    for _ in range(steps):
        for p, ref in zip(params, refs):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g.to(dtype)
            ref.step(g)
        opt.step()
        for p, ref in zip(params, refs):
            worst = max(worst, (p.detach().double() - ref.W).abs().max().item())
    return opt, params, worst


SHAPES = [(6, 5), (6, 5), (6, 5), (5, 12), (5, 12), (4, 4), (4, 4)]


@pytest.mark.parametrize("options", [{}, {"one_sided": True}, {"orthonormalize": "qr"}], ids=str)
def test_stacked_tensors_equal_float64_reference(options):
    """Same-shape matrices stepped as one stack (one-sided, Cholesky-QR refresh too) equal the
    per-matrix reference; the stacks are views, so the per-tensor state format is unchanged."""
    opt, params, worst = run_against_reference(SHAPES, options)
    assert worst < 1e-10
    assert len(opt.stacks) == 3
    state = opt.state[params[3]]  # (5, 12): one-sided keeps only the 5-side
    assert [q is None for q in state["Q"]] == [False, bool(options.get("one_sided"))]
    assert state["exp_avg"].shape == (5, 12) and state["step"] == 11


def test_bf16_preconditioner_as_close_to_reference_as_fp32():
    """bf16 rotations and statistics (the CUDA default) land as near the float64 reference as
    fp32 ones do (on these small random problems fp32 itself drifts: nearly equal eigenvalues)."""
    _, _, bf16 = run_against_reference(SHAPES, {"precondition_dtype": "bfloat16"}, torch.float32)
    _, _, fp32 = run_against_reference(SHAPES, {"precondition_dtype": "float32"}, torch.float32)
    _, _, moved = run_against_reference(SHAPES, {"lr": 1e-12}, torch.float32)
    assert bf16 < 1.5 * fp32 < 0.5 * moved


def test_cholesky_qr_is_qr_up_to_signs_and_falls_back_per_matrix():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    A[1, :, 5] = 0  # singular: its Gram matrix is not positive definite
    Q, Q_ref = cholesky_qr(A), torch.linalg.qr(A).Q
    torch.testing.assert_close(Q[1], Q_ref[1], rtol=0, atol=0)  # QR for that one only
    for i in (0, 2):  # the others: Householder's Q with its columns' signs made positive-R
        signs = torch.sign(torch.diagonal(Q_ref[i].mT @ A[i]))
        torch.testing.assert_close(Q[i], Q_ref[i] * signs, rtol=0, atol=1e-12)


def test_checkpoint_without_one_sided_resumes_two_sided():
    """Checkpoints from before ``one_sided`` existed were two-sided: they resume two-sided under
    today's one-sided default, stepping exactly as the optimizer that saved them."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(6, 5, generator=gen, dtype=torch.float64).requires_grad_()]
    opt = SOAP(params, precondition_frequency=2, one_sided=False)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    for g in grads[:3]:
        params[0].grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("one_sided", "precondition_dtype", "orthonormalize"):
            del group[key]
    clone = [params[0].detach().clone().requires_grad_()]
    resumed = SOAP(clone, precondition_frequency=2)
    assert resumed.param_groups[0]["one_sided"]  # today's default
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["one_sided"] is False
    for g in grads[3:]:
        params[0].grad, clone[0].grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(params[0], clone[0])
