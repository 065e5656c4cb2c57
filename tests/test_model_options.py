"""Speed-run model options: value embeddings, U-net skips, x0 mixing, embedding norm, FlexAttention."""

import pytest
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.model.attention import rms_norm
from muongpt.model.gpt import GPT, GPTConfig

BASE = dict(vocab_size=300, n_layer=4, n_head=2, n_embd=32)


def perturbed(model: GPT, seed: int = 1) -> GPT:
    """Give every parameter (zero-init projections, lambdas) a random offset: all paths live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_options_off_is_the_plain_model():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**BASE))
    torch.manual_seed(0)
    same = GPT(GPTConfig(**BASE, value_embeds=0, unet_skips=False, x0_mix=False))
    idx = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(same(idx, idx), plain(idx, idx), rtol=0, atol=0)


def test_value_embed_layers():
    c = GPTConfig(**{**BASE, "n_layer": 6}, value_embeds=2)
    assert [c.value_embed_of_layer(i) for i in range(6)] == [0, 1, None, None, 0, 1]
    with pytest.raises(MuonGPTError, match="value_embeds"):
        GPTConfig(**BASE, value_embeds=3)


def manual_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The options written out by hand, from the model's own weights: the reference."""
    c = model.config
    x0 = model.embed(idx)
    x0 = rms_norm(x0) if c.embed_norm else x0
    x, skips, n = x0, [], c.n_layer // 2
    for i, block in enumerate(model.blocks):
        if c.unet_skips and i >= c.n_layer - n:
            x = x + model.skip_weights[i - (c.n_layer - n)] * skips.pop()
        if c.x0_mix:
            x = block.x0_lambdas[0] * x + block.x0_lambdas[1] * x0
        a, h = block.mixer, rms_norm(x)
        B, T, D = h.shape
        q, k, v = a.q(h), a.k(h), a.v(h)
        j = c.value_embed_of_layer(i)
        if j is not None:
            v = a.ve_lambdas[0] * v + a.ve_lambdas[1] * model.value_embeds[j](idx)
        q, k, v = (t.view(B, T, c.n_head, -1) for t in (q, k, v))
        q, k = a.rotary(rms_norm(q)), a.rotary(rms_norm(k))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + a.proj(y.transpose(1, 2).reshape(B, T, D))
        x = x + block.mlp(rms_norm(x))
        if c.unet_skips and i < n:
            skips.append(x)
    return model.softcap(model.lm_head(rms_norm(x)).float())[..., : c.vocab_size]


@pytest.mark.parametrize(
    "opts",
    [
        dict(value_embeds=2),
        dict(unet_skips=True),
        dict(x0_mix=True),
        dict(embed_norm=True),
        dict(value_embeds=1, unet_skips=True, x0_mix=True, embed_norm=True),
    ],
)
def test_options_match_manual_reference(opts):
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**BASE, **opts)))
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), manual_forward(model, idx))
    # every new parameter gets a gradient
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_options_keep_causality_and_caches():
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**BASE, value_embeds=1, unet_skips=True, x0_mix=True)))
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        full = model(idx)
        changed = idx.clone()
        changed[0, 12:] = (changed[0, 12:] + 1) % 300
        torch.testing.assert_close(model(changed)[:, :12], full[:, :12])
        caches = model.new_caches(1, 20)
        step = torch.cat([model(idx[:, :10], caches=caches)[:, -1:]] + [
            model(idx[:, t : t + 1], caches=caches) for t in range(10, 20)
        ], dim=1)  # fmt: skip
    torch.testing.assert_close(step[:, 1:], full[:, 10:], atol=1e-4, rtol=1e-4)


def test_flex_attention_document_mask_and_window():
    cfg = dict(BASE, bos_token=7)
    torch.manual_seed(0)
    ref = perturbed(GPT(GPTConfig(**cfg)))
    flex = GPT(GPTConfig(**cfg, attention="flex", doc_mask=True))
    flex.load_state_dict(ref.state_dict())
    idx = torch.randint(8, 300, (2, 64))
    idx[:, 0] = idx[:, 40] = 7  # two documents: 0..39 and 40..63
    with torch.no_grad():  # FlexAttention has no CPU backward
        out = flex(idx)
        torch.testing.assert_close(out[:, :40], ref(idx[:, :40]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 40:], ref(idx[:, 40:]), atol=1e-5, rtol=1e-5)
        # a window as long as the sequence is plain causal attention
        wide = GPT(GPTConfig(**cfg, attention="flex", attn_window=64))
        wide.load_state_dict(ref.state_dict())
        torch.testing.assert_close(wide(idx), ref(idx), atol=1e-5, rtol=1e-5)
        # a 1-token window: each position sees only itself, whatever came before
        one = GPT(GPTConfig(**cfg, attention="flex", attn_window=1))
        one.load_state_dict(ref.state_dict())
        shifted = idx.clone()
        shifted[:, :10] = (shifted[:, :10] + 1) % 300
        torch.testing.assert_close(one(idx)[:, 10:], one(shifted)[:, 10:])


def test_bad_attention_options():
    with pytest.raises(MuonGPTError, match="attention"):
        GPTConfig(**BASE, attention="ring")
    with pytest.raises(MuonGPTError, match="flex"):
        GPTConfig(**BASE, doc_mask=True)
    with pytest.raises(MuonGPTError, match="attn_window"):
        GPTConfig(**BASE, attention="flex", attn_window=-1)
