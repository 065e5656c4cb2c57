"""The GPT model: shapes, sizes, causality, soft-caps, caches and bad configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.generate import generate_tokens
from muongpt.model.attention import Rotary
from muongpt.model.gpt import GPT, GPTConfig, MixingConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    # Output projections start at zero; give them weights so every path carries signal.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize(
    "size,shape,expected_millions",
    [
        # Non-embedding transformer parameters: 12 * n_layer * n_embd^2 (GPT-2's count, no biases).
        ("d12", (12, 12, 768), 12 * 12 * 768**2 / 1e6),
        ("d24", (24, 16, 1024), 12 * 24 * 1024**2 / 1e6),
        ("d36", (36, 20, 1280), 12 * 36 * 1280**2 / 1e6),
        ("d48", (48, 25, 1600), 12 * 48 * 1600**2 / 1e6),
    ],
)
def test_gpt2_sizes(size, shape, expected_millions):
    n_layer, n_head, n_embd = shape
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert blocks == pytest.approx(expected_millions * 1e6)
    assert model.embed.weight.shape == (50304, n_embd)  # 50257 padded to a multiple of 128
    assert model.lm_head.weight.shape == (50304, n_embd)


def test_untied_head_and_zero_init():
    model = GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32))
    assert model.lm_head.weight is not model.embed.weight
    for block in model.blocks:
        assert block.mixer.proj.weight.abs().sum() == 0
        assert block.mlp.proj.weight.abs().sum() == 0
    # With zero output projections and a zero head, every logit is 0: loss = ln(padded vocab).
    idx = torch.randint(0, 300, (2, 8))
    assert model(idx, idx).item() == pytest.approx(math.log(384), rel=1e-6)


def test_logits_fp32_and_unpadded():
    model = tiny()
    logits = model(torch.randint(0, 300, (2, 8)))
    assert logits.dtype == torch.float32 and logits.shape == (2, 8, 300)


def test_causality_of_whole_model():
    model = tiny(n_layer=3)
    idx = torch.randint(0, 300, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 7) % 300
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_matches_reference_cross_entropy():
    model = tiny()
    idx = torch.randint(0, 300, (2, 8))
    hidden = F.rms_norm(_hidden(model, idx), (32,))
    logits = model.lm_head.cap(F.linear(hidden, model.lm_head.weight).float())
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    torch.testing.assert_close(model(idx, idx), ref)


def _hidden(model, idx):
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    return x


def test_tanh_softcap_bounds_the_logits():
    model = tiny(logit_softcap=15.0)
    x = torch.linspace(-100, 100, 101)
    torch.testing.assert_close(model.lm_head.cap(x), 15 * torch.tanh(x / 15))
    logits = model(torch.randint(0, 300, (1, 4)))
    assert logits.abs().max() <= 15
    torch.testing.assert_close(tiny().lm_head.cap(x), x)  # 0: no cap


def rope(t, cos, sin, hd):
    t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
    return torch.cat([t1 * cos + t2 * sin, t2 * cos - t1 * sin], dim=-1)


def reference_forward(model: GPT, idx: torch.Tensor, cap: float) -> torch.Tensor:
    """The core GPT's math written out from the module docstring with plain tensor ops: RMSNorm,
    QK-norm, rotary pairs (i, i + hd/2) at frequency base^(-2i/hd), a causal softmax over an
    explicit mask, ReLU^2, the tanh cap."""

    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    B, T = idx.shape
    x = model.embed.weight[idx]
    for block in model.blocks:
        a = block.mixer
        H, hd = a.n_head, a.head_dim
        h = norm(x)
        q = norm((h @ a.q.weight.T).view(B, T, H, hd))
        k = norm((h @ a.k.weight.T).view(B, T, H, hd))
        v = (h @ a.v.weight.T).view(B, T, H, hd)
        freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angle = torch.arange(T, dtype=torch.float32)[:, None] * freq  # (T, hd/2)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]

        q, k = rope(q, cos, sin, hd), rope(k, cos, sin, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, H * hd)
        x = x + y @ a.proj.weight.T
        m = block.mlp
        x = x + torch.relu(norm(x) @ m.fc.weight.T).pow(2) @ m.proj.weight.T
    logits = norm(x) @ model.lm_head.weight.T
    return (cap * torch.tanh(logits / cap))[..., :300]


def test_model_equals_a_written_out_reference():
    model = tiny(n_layer=3, logit_softcap=15.0)
    idx = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(
        model(idx), reference_forward(model, idx, 15.0), rtol=1e-4, atol=1e-4
    )


def test_rotary_is_a_rotation_with_relative_positions():
    rot = Rotary(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    # Norm preserved, and <R_m q, R_n k> depends only on m - n.
    qm = rot(q.expand(1, 10, 1, 8).contiguous())
    kn = rot(k.expand(1, 10, 1, 8).contiguous())
    torch.testing.assert_close(qm.norm(dim=-1), q.norm(dim=-1).expand(1, 10, 1))
    dots = qm[0, :, 0] @ kn[0, :, 0].T
    torch.testing.assert_close(dots[5, 3], dots[7, 5], rtol=1e-5, atol=1e-5)


def test_compiled_rotary_builds_its_tables_in_the_graph():
    """Under torch.compile the tables are computed in the graph (nothing cached on the module,
    which CUDA graphs would overwrite) and rotate exactly as the eager, cached ones do."""
    rot = Rotary(16, truncate=True)
    x = torch.randn(2, 40, 3, 16)
    got = torch.compile(rot, backend="aot_eager", fullgraph=True)(x, 5)
    assert rot._cache is None
    torch.testing.assert_close(got, rot(x, 5), rtol=0, atol=0)
    assert rot._cache is not None and rot._cache[0] >= 45


def test_kv_cache_equals_full_forward():
    model = tiny(n_layer=3).eval()
    idx = torch.randint(0, 300, (2, 12))
    full = model(idx)
    caches = model.new_caches(2, 12)
    parts = [model(idx[:, :5], caches=caches)]
    parts += [model(idx[:, t : t + 1], caches=caches) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_with_and_without_cache_agree():
    model = tiny().eval()
    a = list(generate_tokens(model, [1, 2, 3], 10, temperature=0.9, top_k=20, seed=3))
    b = list(
        generate_tokens(model, [1, 2, 3], 10, temperature=0.9, top_k=20, seed=3, use_cache=False)
    )
    assert a == b and len(a) == 10 and all(0 <= t < 300 for t in a)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(n_embd=30, n_head=4), "divisible by model.n_head"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
        (dict(mixing=MixingConfig(pattern=["conv"])), "mixing.pattern"),
        (dict(mixing=MixingConfig(pattern=["none"])), "mixing.pattern"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_bad_configs(bad, match):
    with pytest.raises(MuonGPTError, match=match):
        GPTConfig(**{**dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32), **bad})


def test_rope_is_the_identity_at_position_0_and_rotates_by_written_out_angles_at_1():
    head_dim, base = 8, 10000.0
    rope = Rotary(head_dim, base=base)
    x = torch.randn(1, 2, 3, head_dim, generator=torch.Generator().manual_seed(0))
    out = rope(x)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0: angle 0, cos 1, sin 0
    half = head_dim // 2
    expected = torch.empty(3, head_dim)
    for i in range(half):  # pair (i, i + half) turns by 1 * base^(-2i/head_dim)
        theta = base ** (-2 * i / head_dim)
        x1, x2 = x[0, 1, :, i], x[0, 1, :, i + half]
        expected[:, i] = x1 * math.cos(theta) + x2 * math.sin(theta)
        expected[:, i + half] = x2 * math.cos(theta) - x1 * math.sin(theta)
    torch.testing.assert_close(out[0, 1], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope(x[:, 1:], start=1), out[:, 1:], rtol=0, atol=0)


def test_doc_mask_keeps_attention_inside_each_packed_document():
    bos = 299
    torch.manual_seed(1)
    doc_a, doc_b = torch.randint(0, 299, (1, 9)), torch.randint(0, 299, (1, 7))
    second = torch.cat([torch.tensor([[bos]]), doc_b], dim=1)
    row = torch.cat([doc_a, second], dim=1)  # two documents packed in one row
    masked = tiny(doc_mask=True, bos_token=bos).eval()
    plain = tiny().eval()
    with torch.no_grad():
        alone = masked(second)
        # the second document's logits do not see the first (RoPE scores are relative)
        assert torch.allclose(masked(row)[:, doc_a.size(1) :], alone, atol=1e-5)
        assert not torch.allclose(plain(row)[:, doc_a.size(1) :], plain(second), atol=1e-3)
        assert torch.allclose(masked(doc_a), plain(doc_a), atol=1e-6)  # one document: causal
        # decoding treats the prompt as one document: the cache equals the full forward
        caches = masked.new_caches(1, row.size(1))
        stepped = torch.cat([masked(row[:, t : t + 1], caches=caches) for t in range(9)], 1)
        assert torch.allclose(stepped, masked(doc_a), atol=1e-5)
    # PoM layers are not document-masked: their running mean spans the row
    hybrid = tiny(doc_mask=True, bos_token=bos, mixing=MixingConfig(pattern=["pom", "attention"]))
    with torch.no_grad():
        assert not torch.allclose(hybrid(row)[:, doc_a.size(1) :], hybrid(second), atol=1e-3)


def test_flex_attention_converter_takes_a_document_masked_gpt_only():
    from muongpt.kernels.converters import KernelsConfig, apply_converters
    from muongpt.model.masks import flex_or_dense_mask

    model = apply_converters(tiny(doc_mask=True), KernelsConfig(converters=["flex_attention"]))
    assert model.mask_builder is flex_or_dense_mask
    with pytest.raises(MuonGPTError, match="document-masked"):
        apply_converters(tiny(), KernelsConfig(converters=["flex_attention"]))
