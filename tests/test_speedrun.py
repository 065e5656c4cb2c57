"""The speed-run model: each part against a written-out reference, causality, document masks,
windows, decoding, FlexAttention masks and kernels."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kernel_marks import needs_gpu, needs_interpreter
from muongpt import MuonGPTError
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.model.attention import Rotary, rms_norm
from muongpt.model.gpt import MixingConfig
from muongpt.model.masks import document_dense_mask, flex_or_dense_mask
from muongpt.model.speedrun import (
    SpeedrunAttention,
    SpeedrunConfig,
    SpeedrunGPT,
    bigram_rows,
    offset_keys,
)

BOS = 7
BASE = dict(vocab_size=300, n_layer=4, n_head=2, n_embd=32, value_embeds=1, bigram_rows=211)
BASE.update(backout_after=2, attn_window=0, window_pattern=[1.0, 0.5], bos_token=BOS)


def config(**kw) -> SpeedrunConfig:
    return SpeedrunConfig(**{**BASE, **kw})


def perturbed(model: SpeedrunGPT, seed: int = 1) -> SpeedrunGPT:
    """Give every parameter (zero-init projections and tables, lambdas) a random offset."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def speedrun(seed: int = 0, **kw) -> SpeedrunGPT:
    torch.manual_seed(seed)
    return perturbed(SpeedrunGPT(config(**kw)))


def documents(B: int, T: int, starts, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(BOS + 1, 300, (B, T), generator=g)
    for b, s in starts:
        idx[b, s] = BOS
    return idx


def manual_forward(model: SpeedrunGPT, idx: torch.Tensor) -> torch.Tensor:
    """The module docstring's math written out with the model's own weights: the reference."""
    c = model.config
    B, T = idx.shape
    H, hd = c.n_head, c.n_embd // c.n_head
    docs = (idx == BOS).cumsum(-1)
    pos = torch.arange(T)
    x = x0 = rms_norm(model.embed(idx))
    prev = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], 1)
    a_, b_ = 40503, 65599
    rows = torch.bitwise_xor(idx * a_, prev * b_) % (c.bigram_rows - 1)
    rows = torch.where((prev < 0) | (idx == BOS), c.bigram_rows - 1, rows)
    bigram = model.bigram_embed(rows)
    n, skips, early, lane = c.n_layer // 2, [], None, None
    outputs = {}  # every block's output, for explicit skip pairs
    streams = {0: x}  # the dense connections' sources: s = the stream after s blocks
    longest = max(c.window_pattern)
    for i, block in enumerate(model.blocks):
        if i == c.backout_after:
            early = x
        if c.parallel_from and i == c.parallel_from:
            lane = x  # the second residual lane, read by the MLPs from here on
        g = c.gate_dims
        j = source = None
        if c.skip_pairs is None and i >= c.n_layer - n:  # U-net: last in, first out
            j, source = i - (c.n_layer - n), skips.pop()
        for m, (a_, b_) in enumerate(c.skip_pairs or []):
            if b_ == i:
                j, source = m, outputs[a_]
        if j is not None:
            skip = model.skip_weights[j] * source
            if g:  # 2 sigmoid(w . x[:g] / rms(x[:g]))
                head = x[..., :g]
                head = head / head.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
                w = model.skip_gates[j * g : (j + 1) * g]
                skip = skip * 2 * torch.sigmoid(head @ w)[..., None]
            x = x + skip
            lane = None if lane is None else lane + skip
        x = x + model.bigram_lambdas[i] * bigram
        if lane is not None:
            lane = lane + model.bigram_lambdas[i] * bigram
        if i in c.dense_layers:  # sum_s (c_ts + w_ts . x[:g] / rms(x[:g])) h_s
            t, S = c.dense_layers.index(i), len(c.dense_sources)
            head = x[..., :g]
            head = head / head.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            for m, s in enumerate(c.dense_sources):
                at = t * S + m
                w = model.dense_weights[at * g : (at + 1) * g]
                mixed = (model.dense_bias[at] + head @ w)[..., None] * streams[s]
                x = x + mixed
                lane = None if lane is None else lane + mixed
        x = block.x0_lambdas[0] * x + block.x0_lambdas[1] * x0
        if lane is not None:
            lane = block.x0_lambdas[0] * lane + block.x0_lambdas[1] * x0
        lw = block.lane_weights  # (attention -> x, attention -> lane, MLP -> x, MLP -> lane)
        a = block.mixer
        if a is not None:
            h = rms_norm(x)
            q, k, v = a.q(h), a.k(h), a.v(h)
            j = c.value_embed_of_layer(i)
            q, k, v = (t.view(B, T, H, hd) for t in (q, k, v))
            if j is not None:
                ve = model.value_embeds[j](idx).view(B, T, H, hd)
                if g:  # one gate per head: 2 sigmoid(w_h . h[:g])
                    w = a.ve_gate.view(H, g)
                    ve = (
                        ve
                        * 2
                        * torch.sigmoid(torch.einsum("btk,hk->bth", h[..., :g], w))[..., None]
                    )
                v = a.ve_lambdas[0] * v + a.ve_lambdas[1] * ve
            q, k = a.rotary(rms_norm(q)), a.rotary(rms_norm(k))
            fraction = c.window_of_layer(i)
            if fraction == longest:  # key offset: unrotated dims from the token before
                still = torch.cat([torch.arange(hd // 4, hd // 2), torch.arange(3 * hd // 4, hd)])
                shifted = torch.zeros_like(k[..., still])
                shifted[:, 1:] = k[:, :-1][..., still]
                k = k.clone()
                k[..., still] = shifted
            window = int(model.current_window)
            window = window if fraction == 1.0 else max(int(window * fraction), 1)
            # paired heads: position n = 2t + j holds head 2p + j of token t, as head p
            paired = i in c.paired_head_layers
            at = torch.arange(2 * T) if paired else pos
            tok = at // 2 if paired else at
            heads = (2 * torch.arange(H // 2)[None] + (at % 2)[:, None]) if paired else None
            if paired:
                q, k, v = (t[:, tok[:, None], heads] for t in (q, k, v))
            gap = at[:, None] - at[None, :]
            same_doc = docs[:, tok, None] == docs[:, None, tok]
            keep = (gap >= 0) & (gap < window) & same_doc
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (c.attn_scale or hd**-0.5)
            att = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
            y = torch.einsum("bhqk,bkhd->bqhd", att, v)
            if paired:
                out = torch.empty(B, T, H, hd)
                out[:, tok[:, None], heads] = y
                y = out
                own = torch.empty(B, T, H, hd)
                own[:, tok[:, None], heads] = v
                v = own
            if c.exclusive_attention:  # y - tanh(a_h) (y . v^) v^
                unit = v / v.norm(dim=-1, keepdim=True)
                share = torch.tanh(a.xsa_logits)[:, None]
                y = y - share * torch.einsum("bthd,bthd->bth", y, unit)[..., None] * unit
            out = a.proj(y.reshape(B, T, c.n_embd))
            if lane is None:
                x = x + out
            else:
                x, lane = x + lw[0] * out, lane + lw[1] * out
        if i not in c.mlp_free_layers:
            if lane is None:
                x = x + block.mlp(rms_norm(x))
            else:
                out = block.mlp(rms_norm(lane))
                x, lane = x + lw[2] * out, lane + lw[3] * out
        if i < n:
            skips.append(x)
        outputs[i] = streams[i + 1] = x
    if lane is not None:
        x = (x + lane) / 2
    x = x - model.backout_lambda * early
    A, B_, C = c.sigmoid_cap
    logits = A * torch.sigmoid((model.lm_head.project(rms_norm(x)) + C) / B_)
    return logits[..., : c.vocab_size]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        dict(attn_window=5, window_pattern=[1.0, 0.5, 0.5]),
        dict(mixing=MixingConfig(pattern=["attention", "none"]), attn_scale=0.3),
        dict(n_layer=6, value_embeds=2, backout_after=4, window_pattern=[0.5, 1.0]),
        dict(n_head=4, paired_head_layers=[0, 1], attn_window=5, window_pattern=[1.0, 0.5, 0.5]),
        dict(n_layer=6, value_embeds=2, backout_after=4, gate_dims=5),
        dict(exclusive_attention=True, attn_window=5, window_pattern=[1.0, 0.5, 0.5]),
        dict(n_head=4, paired_head_layers=[1], exclusive_attention=True),
        dict(mlp_free_layers=[0, 2]),
        dict(parallel_from=1),  # lanes before the backout and the U-net skips are read
        dict(n_layer=6, value_embeds=2, backout_after=4, parallel_from=3, mlp_free_layers=[4]),
        dict(parallel_from=2, mixing=MixingConfig(pattern=["attention", "attention", "none"])),
        dict(gate_dims=5, dense_layers=[3], dense_sources=[0, 2]),
        dict(skip_pairs=[[1, 3]], gate_dims=3),
        dict(skip_pairs=[], gate_dims=3),  # no skips
        dict(skip_pairs=[[0, 2], [0, 3]], parallel_from=1),
        dict(gate_dims=5, dense_layers=[2, 3], dense_sources=[1], parallel_from=1),
    ],
)
def test_model_equals_the_written_out_reference(extra):
    model = speedrun(**extra)
    idx = documents(2, 24, [(0, 0), (0, 9), (1, 17)])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), manual_forward(model, idx), atol=1e-5, rtol=1e-5)
    model(idx, idx.roll(-1, 1)).backward()
    for name, p in model.named_parameters():  # every part takes part in training
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "extra",
    [
        {},
        dict(attn_window=6),
        dict(mixing=MixingConfig(pattern=["none", "attention"])),
        dict(n_head=4, paired_head_layers=[0, 3], attn_window=6),
        dict(gate_dims=4),
        dict(exclusive_attention=True, n_head=4, paired_head_layers=[0]),
        dict(parallel_from=1),
        dict(gate_dims=4, dense_layers=[2, 3], dense_sources=[0, 1]),
        dict(skip_pairs=[[0, 3]], gate_dims=4),
    ],
)
def test_causal_and_chunked_decoding_equals_the_full_forward(extra):
    """Decoding with caches (KV, the last key for the offset, the last token for the bigram)
    in uneven chunks gives the logits of one forward pass over one document."""
    model = speedrun(**extra)
    idx = documents(2, 20, [])
    with torch.no_grad():
        full = model(idx)
        changed = idx.clone()
        changed[:, 12:] = (changed[:, 12:] + 1) % 300
        torch.testing.assert_close(model(changed)[:, :12], full[:, :12])
        caches = model.new_caches(2, 20)
        parts = [model(idx[:, a:b], caches=caches) for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_a_document_sees_nothing_of_the_one_before_but_its_last_key():
    """The second document's logits equal those of the model run on it alone, given the first
    document's last token: the key offset hands that token's key dims over (as modded-nanogpt
    does); RoPE is relative, so the shift in position does not matter."""
    model = speedrun()
    idx = documents(1, 40, [(0, 0), (0, 25)])
    with torch.no_grad():
        full = model(idx)
        alone = model(idx[:, 24:])
        torch.testing.assert_close(full[:, 25:], alone[:, 1:], atol=1e-4, rtol=1e-4)
        other = idx.clone()
        other[:, 1:24] = (other[:, 1:24] + 1) % 300  # change document 1, but not its last token
        other[:, 1:24] = torch.where(other[:, 1:24] == BOS, BOS + 1, other[:, 1:24])
        torch.testing.assert_close(model(other)[:, 25:], full[:, 25:], atol=1e-4, rtol=1e-4)


def test_window_schedule_changes_the_mask_not_the_model():
    model = speedrun(window_pattern=[1.0])
    idx = documents(1, 64, [])
    with torch.no_grad():
        wide = model(idx)
        model.set_attn_window(1)  # each token sees only itself (and, by the offset, t - 1)
        shifted = idx.clone()
        shifted[:, :30] = (shifted[:, :30] + 1) % 300
        torch.testing.assert_close(model(idx)[:, 31:], model(shifted)[:, 31:])
        model.set_attn_window(0)  # unbounded again
        torch.testing.assert_close(model(idx), wide)
    with pytest.raises(MuonGPTError, match="window"):
        model.set_attn_window(-5)


def test_window_pattern_gives_short_window_layers():
    """A layer at fraction 0.5 of a 16-token window is a layer with an 8-token window."""
    half = speedrun(attn_window=16, window_pattern=[0.5])
    eight = SpeedrunGPT(config(attn_window=8, window_pattern=[1.0]))
    eight.load_state_dict(half.state_dict())
    idx = documents(1, 40, [])
    with torch.no_grad():
        torch.testing.assert_close(half(idx), eight(idx))
    with pytest.raises(MuonGPTError, match="window_pattern"):
        config(window_pattern=[1.5])


def test_mlp_only_layer_equals_attention_with_a_silent_output():
    none = speedrun(mixing=MixingConfig(pattern=["attention", "none"]), value_embeds=0)
    full = SpeedrunGPT(config(value_embeds=0))
    assert none.blocks[1].mixer is None and none.blocks[2].mixer is not None
    missing, unexpected = full.load_state_dict(none.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("blocks.1.mixer", "blocks.3.mixer")) for k in missing
    )
    with torch.no_grad():
        for i in (1, 3):
            full.blocks[i].mixer.proj.weight.zero_()
        idx = documents(2, 24, [])
        torch.testing.assert_close(none(idx), full(idx))


@pytest.mark.parametrize("parallel_from", [0, 2])
def test_bf16_residual_stream_under_autocast(parallel_from):
    model = speedrun(parallel_from=parallel_from)
    idx = documents(2, 24, [])
    dtypes = []
    hook = model.blocks[-1].register_forward_hook(
        lambda m, i, o: dtypes.append({t.dtype for t in o if t is not None})
    )
    with torch.no_grad():
        want = model(idx, idx)
        with torch.autocast("cpu", torch.bfloat16):
            got = model(idx, idx)
    hook.remove()
    assert dtypes == [{torch.float32}, {torch.bfloat16}]  # both lanes, with parallel residuals
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)


def test_key_offset_shifts_only_the_unrotated_key_dims_of_long_window_layers():
    rot = Rotary(16, truncate=True)
    k = torch.randn(2, 5, 2, 16)
    out = offset_keys(k, None)
    still = [4, 5, 6, 7, 12, 13, 14, 15]  # [hd/4, hd/2) and [3hd/4, hd): zero RoPE frequency
    rotated = [0, 1, 2, 3, 8, 9, 10, 11]
    assert rot.inv_freq[still[:4]].eq(0).all() and rot.inv_freq[:4].gt(0).all()
    torch.testing.assert_close(out[..., rotated], k[..., rotated], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:, :, still], k[:, :-1, :, still], rtol=0, atol=0)
    assert out[:, 0, :, still].eq(0).all()
    model = SpeedrunGPT(config(window_pattern=[1.0, 0.5]))
    assert [b.mixer.key_offset for b in model.blocks] == [True, False, True, False]


def test_attention_scale_matches_the_written_out_softmax():
    torch.manual_seed(0)
    attn = SpeedrunAttention(config(attn_scale=0.3, value_embeds=0), 1)
    x = torch.randn(2, 10, 32)
    mask = document_dense_mask(torch.zeros(2, 10, dtype=torch.int32))
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(32))
        q = attn.rotary(rms_norm(attn.q(x).view(2, 10, 2, 16))).transpose(1, 2)
        k = attn.rotary(rms_norm(attn.k(x).view(2, 10, 2, 16))).transpose(1, 2)
        v = attn.v(x).view(2, 10, 2, 16).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * 0.3
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
        torch.testing.assert_close(attn(x, mask=mask), want, atol=1e-5, rtol=1e-5)


def test_parts_start_as_a_plain_stream_and_are_declared_to_the_optimizer():
    model = SpeedrunGPT(config())
    assert model.bigram_embed.weight.abs().sum() == 0  # a zero table adds nothing at first
    groups = {k: [n for n, _ in v] for k, v in model.optimizer_groups().items()}
    assert groups["embed"] == ["embed.weight", "value_embeds.0.weight", "bigram_embed.weight"]
    assert groups["head"] == ["lm_head.weight"]
    assert {"bigram_lambdas", "backout_lambda", "skip_weights"} <= set(groups["scalar"])
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in groups["matrix"])
    assert sorted(n for g in groups.values() for n in g) == sorted(
        n for n, _ in model.named_parameters()
    )
    assert (
        model.num_params(non_embedding=True) == model.num_params() - 3 * 384 * 32 + (384 - 211) * 32
    )


@pytest.mark.parametrize("parallel_from", [0, 2])
def test_residual_scale_init_starts_every_blocks_stream_scale(parallel_from):
    """x <- a x + b x0 (and the second lane's u <- a u + b x0) starts at a = residual_scale_init,
    b = 0, in every block; the default is the plain stream, a = 1."""
    for s in (1.1, 1.0):
        kw = dict(residual_scale_init=s) if s != 1.0 else {}
        model = SpeedrunGPT(config(parallel_from=parallel_from, **kw))
        for block in model.blocks:
            assert torch.equal(block.x0_lambdas.detach(), torch.tensor([s, 0.0]))


def test_config_errors_name_the_key():
    for bad, match in (
        (dict(bigram_rows=1), "bigram_rows"),
        (dict(backout_after=4), "backout_after"),
        (dict(value_embeds=3), "value_embeds"),
        (dict(n_head=4, n_embd=24), "divisible by 4"),
        (dict(attn_scale=-1.0), "attn_scale"),
        (dict(mixing=MixingConfig(pattern=["pom"])), "mixing.pattern"),
        (dict(paired_head_layers=[4]), "paired_head_layers: 4 is not an attention layer"),
        (dict(paired_head_layers=[1], mixing=MixingConfig(["attention", "none"])), "layer"),
        (dict(paired_head_layers=[0], n_head=1), "even model.n_head"),
        (dict(gate_dims=33), "gate_dims"),
        (dict(parallel_from=4), "parallel_from"),
        (dict(parallel_from=-1), "parallel_from"),
        (dict(residual_scale_init=0.0), "residual_scale_init"),
        (dict(skip_pairs=[[2, 2]]), "skip_pairs"),
        (dict(skip_pairs=[[0, 4]]), "skip_pairs"),
        (dict(skip_pairs=[[0, 3], [1, 3]]), "one per target block"),
        (dict(gate_dims=4, dense_layers=[2]), "dense_layers and model.dense_sources go together"),
        (dict(dense_layers=[2], dense_sources=[0]), "gate_dims > 0"),
        (dict(gate_dims=4, dense_layers=[1], dense_sources=[1]), "before the first"),
        (dict(gate_dims=4, dense_layers=[3], dense_sources=[2, 0]), "ascending"),
        (dict(gate_dims=4, dense_layers=[4], dense_sources=[0]), "n_layer = 4"),
        (dict(mlp_free_layers=[4]), "mlp_free_layers: 4 is not an attention layer"),
        (dict(mlp_free_layers=[1], mixing=MixingConfig(["attention", "none"])), "mlp_free"),
    ):
        with pytest.raises(MuonGPTError, match=match):
            config(**bad)


def test_flex_converter_needs_the_speedrun_model():
    from muongpt.model.gpt import GPT, GPTConfig

    with pytest.raises(MuonGPTError, match="flex_attention needs a document-masked model"):
        apply_converters(
            GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2)), KernelsConfig(["flex_attention"])
        )
    model = apply_converters(SpeedrunGPT(config()), KernelsConfig(["flex_attention"]))
    assert model.mask_builder is flex_or_dense_mask  # dense on CPU, block masks on GPU


def dense_reference_mask(docs: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, T, T) token-level mask written out directly: causal, same document, window."""
    T = docs.size(1)
    q = torch.arange(T)[:, None]
    kv = torch.arange(T)[None, :]
    keep = (q >= kv) & (q - kv < (window or T))
    return (keep[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


def block_table(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, 1, n, n) bool: row i marks the first counts[i] entries of indices[i]; each row of
    indices must be a permutation of 0 .. n-1 (no block listed twice)."""
    n = indices.size(-1)
    assert torch.equal(indices.sort(-1).values, torch.arange(n).expand_as(indices).to(indices))
    listed = torch.arange(n)[None, None, None, :] < counts[..., None]
    table = torch.zeros(*indices.shape, dtype=torch.bool)
    return table.scatter_(-1, indices.long(), listed)


def expand_block_mask(mask, T: int) -> torch.Tensor:
    """Token-level (B, 1, T, T) mask a kernel sees: full blocks all true, partial blocks through
    mask_mod, every other block false. (The CPU eager path evaluates mask_mod everywhere, so it
    would not notice a wrong block decision; this does.)"""
    from muongpt.model.masks import FLEX_BLOCK

    B, n = mask.kv_num_blocks.shape[0], mask.kv_num_blocks.shape[-1]
    out = torch.zeros(B, 1, n * FLEX_BLOCK, n * FLEX_BLOCK, dtype=torch.bool)
    tokens = torch.arange(FLEX_BLOCK)
    for b in range(B):
        for i in range(n):
            rows = slice(i * FLEX_BLOCK, (i + 1) * FLEX_BLOCK)
            full = mask.full_kv_indices[b, 0, i, : mask.full_kv_num_blocks[b, 0, i]]
            part = mask.kv_indices[b, 0, i, : mask.kv_num_blocks[b, 0, i]]
            assert not set(full.tolist()) & set(part.tolist())
            for j in full.tolist():
                out[b, 0, rows, j * FLEX_BLOCK : (j + 1) * FLEX_BLOCK] = True
            for j in part.tolist():
                q = (i * FLEX_BLOCK + tokens)[:, None].clamp(max=T - 1)
                kv = (j * FLEX_BLOCK + tokens)[None, :].clamp(max=T - 1)
                out[b, 0, rows, j * FLEX_BLOCK : (j + 1) * FLEX_BLOCK] = mask.mask_mod(b, 0, q, kv)
    return out[..., :T, :T]


@pytest.mark.parametrize("T", [384, 300])  # whole 128-blocks, and a padded last block
@pytest.mark.parametrize("window", [0, 1, 100, 128, 200, 256])
def test_hand_built_block_mask_equals_dense_mask(T, window):
    """Every skipped / full / partial block decision agrees with the token-level mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from muongpt.model.masks import document_block_mask, document_dense_mask

    g = torch.Generator().manual_seed(T + window)
    starts = torch.zeros(2, T, dtype=torch.bool)
    starts[0, [0, 5, 127, 128, 129, 260]] = True  # documents starting on and around block edges
    starts[1, [0, 200]] = True
    docs = starts.cumsum(-1, dtype=torch.int32)
    mask = document_block_mask(docs, torch.tensor(window or T))
    dense = dense_reference_mask(docs, window)
    assert torch.equal(expand_block_mask(mask, T), dense)
    # the backward's query-block lists (dk, dv) are the transpose of the forward's kv-block lists
    for kv, q in (("kv", "q"), ("full_kv", "full_q")):
        by_kv = block_table(getattr(mask, f"{kv}_num_blocks"), getattr(mask, f"{kv}_indices"))
        by_q = block_table(getattr(mask, f"{q}_num_blocks"), getattr(mask, f"{q}_indices"))
        assert torch.equal(by_q, by_kv.mT)
    assert torch.equal(document_dense_mask(docs, torch.tensor(window or T)), dense)
    q, k, v = (torch.randn(2, 2, T, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        (a.detach().float() - b.detach().float()).norm() / b.float().norm().clamp(min=1e-30)
    )


def test_block_lists_are_each_rows_true_blocks_first_then_the_rest():
    """``_ordered`` (binary searches of running counts) against a stable sort: per row the count
    of True blocks, and the column indices, True ones first, each part ascending."""
    from muongpt.model.masks import _ordered

    g = torch.Generator().manual_seed(0)
    dense = torch.rand(3, 9, 9, generator=g) < 0.4
    dense[0, 0], dense[0, 1] = True, False  # rows all True and all False
    counts, indices = _ordered(dense)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts[:, 0], dense.sum(-1, dtype=torch.int32))
    want = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True)
    assert torch.equal(indices[:, 0].long(), want)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
def test_block_mask_traced_into_a_graph_equals_the_eager_one(device):
    """The mask built inside a compiled function (inductor, one graph) has the eager build's
    block counts and lists, for a window given as a tensor and for a new window value. On CUDA
    (passed on an H200, torch 2.11, 2026-12-05) it places the wrong attention of the traced
    build (the strict expected failure below) in the kernel that reads the lists, not in them."""
    from muongpt.model.masks import document_block_mask

    T = 1000
    starts = torch.zeros(2, T, dtype=torch.bool, device=device)
    starts[0, [0, 5, 127, 128, 129, 260, 700]] = True
    starts[1, [0, 200, 999]] = True
    docs = starts.cumsum(-1, dtype=torch.int32)

    def tables(docs, window):
        m = document_block_mask(docs, window)
        return (m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices,
                m.q_num_blocks, m.q_indices, m.full_q_num_blocks, m.full_q_indices)  # fmt: skip

    torch.compiler.reset()
    traced = torch.compile(tables, fullgraph=True, dynamic=False)
    for window in (300, 1 << 30, 128):
        w = torch.tensor(window, dtype=torch.int32, device=device)
        for got, want in zip(traced(docs, w), tables(docs, w), strict=True):
            assert torch.equal(got, want)


def test_compiled_block_lists_equal_the_eager_ones_inside_a_compiled_model():
    """``compiled_block_lists``: the lists from their own graph, called (as the model calls its
    mask builder) from a graph-broken function inside a compiled one, equal the eager lists, for
    windows given as tensors, a new value not recompiling either graph."""
    from muongpt.model.masks import (
        compiled_block_lists,
        document_block_mask,
        eager_compiled_lists_block_mask,
    )

    T = 1024
    starts = torch.zeros(1, T, dtype=torch.bool)
    starts[0, [0, 5, 127, 128, 129, 260, 700]] = True
    docs = starts.cumsum(-1, dtype=torch.int32)

    def tables(m):
        return (m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices,
                m.q_num_blocks, m.q_indices, m.full_q_num_blocks, m.full_q_indices)  # fmt: skip

    torch.compiler.reset()
    compiled_block_lists.cache_clear()
    model_like = torch.compile(lambda d, w: tables(eager_compiled_lists_block_mask(d + 0, w)))
    for i, window in enumerate((300, 1 << 30, 128)):
        w = torch.tensor(window, dtype=torch.int32)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = model_like(docs, w)
        for a, b in zip(got, tables(document_block_mask(docs, w)), strict=True):
            assert torch.equal(a, b)
    assert compiled_block_lists.cache_info().currsize == 1


def test_compiled_block_lists_converter_needs_flex_attention_first():
    from muongpt.model.masks import flex_or_dense_mask_compiled_lists

    model = speedrun()
    with pytest.raises(MuonGPTError, match="compiled_block_lists comes after flex_attention"):
        apply_converters(model, KernelsConfig(converters=["compiled_block_lists"]))
    apply_converters(model, KernelsConfig(converters=["flex_attention", "compiled_block_lists"]))
    assert model.mask_builder is flex_or_dense_mask_compiled_lists


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [512, 256, 0])
@pytest.mark.parametrize(
    "build",
    [
        "eager",
        "compiled_lists",
        pytest.param("traced", marks=pytest.mark.xfail(strict=True, reason="torch 2.11, CUDA")),
    ],
    ids=["eager_build", "compiled_lists", "traced_build"],
)
def test_flex_kernel_with_the_block_mask_matches_dense_sdpa_on_cuda(window, build):
    """The compiled FlexAttention kernel with the hand-built mask: output and q/k/v gradients
    equal dense-mask SDPA (fp32), on documents that straddle 128-token blocks; the mask built
    eagerly, and inside a compiled function: eagerly there (the model's way) or traced into the
    graph, which gives wrong attention on an H200 with torch 2.11 at every window here
    (2026-12-05; at 512 relative errors 0.4 in the output, 30 in the gradients) although the
    traced block lists equal the eager ones there (the test above): why the model builds it
    eagerly, or with the lists from a graph of their own (``compiled_block_lists``). Strict, so a
    torch that computes it right shows."""
    from torch.nn.attention.flex_attention import flex_attention

    from muongpt.model.masks import (
        document_block_mask,
        document_dense_mask,
        eager_compiled_lists_block_mask,
        eager_document_block_mask,
    )

    torch.manual_seed(0)
    T = 1024
    starts = torch.zeros(2, T, dtype=torch.bool, device="cuda")
    starts[0, [0, 100, 300, 700]] = True
    starts[1, [0, 640]] = True
    docs = starts.cumsum(-1, dtype=torch.int32)
    w = torch.tensor(window or 2**30, device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(2, 2, T, 64, device="cuda", requires_grad=True) for _ in range(3))
    go = torch.randn(2, 2, T, 64, device="cuda")
    out = torch.compile(flex_attention)(q, k, v, block_mask=document_block_mask(docs, w))
    got = [out, *torch.autograd.grad(out, (q, k, v), go)]

    builder = {
        "eager": eager_document_block_mask,
        "compiled_lists": eager_compiled_lists_block_mask,
        "traced": document_block_mask,
    }[build]

    def attend(q, k, v, docs, w):
        return flex_attention(q, k, v, block_mask=builder(docs, w))

    torch.compiler.reset()
    out_compiled = torch.compile(attend, dynamic=False)(q, k, v, docs, w)
    got += [out_compiled, *torch.autograd.grad(out_compiled, (q, k, v), go)]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_dense_mask(docs, w))
    want = [ref, *torch.autograd.grad(ref, (q, k, v), go)] * 2
    errors = [relative_error(a, b) for a, b in zip(got, want, strict=True)]
    assert max(errors) < 1e-3, f"relative errors out, dq, dk, dv (eager, compiled): {errors}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "window_pattern,paired", [([1.0], []), ([1.0, 0.5], []), ([1.0, 0.5], [1])]
)
def test_compiled_flex_model_on_cuda_matches_dense_sdpa(window_pattern, paired):
    """The GPU path end to end: the compiled speed-run model with the flex_attention converter
    (documents, a window changed without recompiling, the key offset traced) gives the loss and
    gradients of the same model on dense-mask SDPA, in training and under no_grad."""
    cfg = dict(vocab_size=512, n_layer=2, n_head=2, n_embd=128, attn_window=512)
    cfg.update(window_pattern=window_pattern, value_embeds=1, backout_after=1)
    cfg.update(paired_head_layers=paired)  # a paired layer's mask covers 2 x 1024 positions
    flex = speedrun(**cfg)
    flex = apply_converters(flex, KernelsConfig(["flex_attention"])).cuda()
    builder = flex.mask_builder
    idx = documents(2, 1024, [(0, 0), (0, 100), (0, 300), (0, 700), (1, 0), (1, 640)]).cuda()
    torch.compiler.reset()
    compiled = torch.compile(flex, dynamic=False)
    for window in (512, 256, 0):
        flex.set_attn_window(window)
        flex.zero_grad()
        loss = compiled(idx, idx.roll(-1, 1))
        loss.backward()
        got = [p.grad.clone() for p in flex.parameters()]
        flex.zero_grad()
        flex.mask_builder = document_dense_mask  # the same rule, dense, through SDPA
        ref = flex(idx, idx.roll(-1, 1))
        ref.backward()
        flex.mask_builder = builder
        names = [n for n, _ in flex.named_parameters()]
        errors = {
            n: relative_error(a, p.grad)
            for n, a, p in zip(names, got, flex.parameters(), strict=True)
        }
        # flex's fp32 kernels are not bit-exact with SDPA: 1.4e-4 relative on this loss was
        # measured (H100); a wrong mask moves the loss and gradients by far more.
        assert relative_error(loss, ref) < 1e-3
        assert max(errors.values()) < 5e-2, f"window {window}: {errors}"
        with torch.no_grad():
            assert relative_error(compiled(idx, idx.roll(-1, 1)), ref) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speedrun_model_trains_under_cuda_graphs():
    """torch.compile's CUDA graphs (mode reduce-overhead) replay the flex model's training step:
    three SGD steps give the losses of the same model compiled without them (a graph output kept
    on a module between steps, as a cached rotary table was, breaks the second replay)."""
    cfg = dict(vocab_size=512, n_layer=2, n_head=2, n_embd=128, attn_window=512, backout_after=1)
    idx = documents(2, 1024, [(0, 0), (0, 300), (1, 0), (1, 640)]).cuda()
    losses = []
    for mode in ("reduce-overhead", "default"):
        torch.compiler.reset()
        model = apply_converters(speedrun(**cfg), KernelsConfig(["flex_attention"])).cuda()
        compiled = torch.compile(model, dynamic=False, mode=mode)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        losses.append([])
        for _ in range(3):
            loss = compiled(idx, idx.roll(-1, 1))
            loss.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)


def test_half_truncated_rope_leaves_half_the_dims_unrotated():
    rot = Rotary(16, base=1024.0, truncate=True)
    torch.testing.assert_close(rot.inv_freq[:4], 1024.0 ** -torch.linspace(0, 1, 4))
    assert torch.all(rot.inv_freq[4:] == 0)
    x = torch.randn(1, 9, 2, 16)
    y = rot(x)
    still = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])  # zero-frequency pairs
    torch.testing.assert_close(y[..., still], x[..., still])
    assert not torch.allclose(y[:, 1:, :, :4], x[:, 1:, :, :4])  # the others rotate
    with pytest.raises(MuonGPTError, match="divisible by 4"):
        Rotary(6, truncate=True)


def test_dense_mask_refuses_a_size_it_cannot_hold():
    from muongpt.model.masks import document_dense_mask

    with pytest.raises(MuonGPTError, match="dense 1 x 65536 x 65536 mask"):
        document_dense_mask(torch.zeros(1, 65536, dtype=torch.int32))


def test_bigram_rows_hash_pairs_and_reserve_a_row_for_no_predecessor():
    idx = torch.randint(0, 300, (3, 40))
    rows = bigram_rows(idx, 97)
    assert rows.shape == idx.shape and rows.dtype == torch.long
    assert (rows[:, 0] == 96).all() and (rows[:, 1:] < 96).all() and (rows >= 0).all()
    # a row depends on the pair only: equal pairs share it, wherever they are
    pairs = {}
    for b in range(3):
        for t in range(1, 40):
            key = (int(idx[b, t - 1]), int(idx[b, t]))
            assert pairs.setdefault(key, int(rows[b, t])) == int(rows[b, t])
    # the order of the pair matters (x y and y x are different bigrams)
    ab, ba = bigram_rows(torch.tensor([[5, 9]]), 1001), bigram_rows(torch.tensor([[9, 5]]), 1001)
    assert ab[0, 1] != ba[0, 1]
    # chunks that carry the previous token give the rows of the whole sequence
    split = torch.cat(
        [bigram_rows(idx[:, :13], 97), bigram_rows(idx[:, 13:], 97, idx[:, 12:13])], 1
    )
    assert torch.equal(split, rows)
    # document starts read the reserved row
    idx[:, 20] = 7
    assert (bigram_rows(idx, 97, doc_start=7)[:, 20] == 96).all()


def test_stretched_rope_keeps_fast_frequencies_and_interpolates_slow_ones():
    rotary = Rotary(32, base=1024.0, truncate=True)
    wide = rotary.stretched(4.0, context=512)
    turns = 512 * rotary.inv_freq / (2 * torch.pi)
    ratio = wide.inv_freq / rotary.inv_freq.clamp(min=1e-30)
    fast, slow = turns >= 32, (turns > 0) & (turns <= 1)
    assert fast.any() and slow.any()
    torch.testing.assert_close(ratio[fast], torch.ones(int(fast.sum())))
    torch.testing.assert_close(ratio[slow], torch.full((int(slow.sum()),), 0.25))
    assert (wide.inv_freq[rotary.inv_freq == 0] == 0).all()  # unrotated dims stay unrotated
    real = rotary.inv_freq > 0
    assert ((ratio[real] >= 0.25 - 1e-6) & (ratio[real] <= 1 + 1e-6)).all()
    assert torch.equal(rotary.stretched(1.0, context=512).inv_freq, rotary.inv_freq)


def test_eval_window_factor_widens_windows_in_eval_mode_only():
    plain = speedrun(attn_window=6, window_pattern=[1.0, 0.5])
    model = speedrun(attn_window=6, window_pattern=[1.0, 0.5], eval_window_factor=2.0)
    idx = documents(2, 40, [(1, 9)])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx))  # training mode: as trained
        model.eval()
        # the eval-mode model is the written-out reference with the windows doubled, each
        # layer's RoPE stretched and YaRN's temperature on the softmax scale
        reference = speedrun(attn_window=12, window_pattern=[1.0, 0.5])
        reference.load_state_dict(model.state_dict())
        for mine, theirs in zip(model.blocks, reference.blocks):
            theirs.mixer.rotary = mine.mixer.eval_rotary
        t = (0.1 * torch.log(torch.tensor(2.0)).item() + 1) ** 2
        reference.config.attn_scale = (model.config.attn_scale or 16**-0.5) * t
        torch.testing.assert_close(model(idx), manual_forward(reference, idx), atol=1e-5, rtol=1e-5)
        # decoding in eval mode uses the same wider window (a prompt is one document)
        one_doc = documents(2, 40, [])
        caches = model.new_caches(2, 40)
        stepped = torch.cat([model(one_doc[:, i : i + 1], caches=caches) for i in range(40)], 1)
        torch.testing.assert_close(stepped, model(one_doc), atol=1e-4, rtol=1e-4)
    with pytest.raises(MuonGPTError, match="eval_window_factor"):
        config(attn_window=0, eval_window_factor=2.0)
    with pytest.raises(MuonGPTError, match="eval_window_factor"):
        config(attn_window=8, eval_window_factor=0.5)


def test_gates_start_at_one_and_train_as_scalars():
    """Zero gate weights give the ungated model's logits; the weights go to the scalar group."""
    gated = speedrun(gate_dims=6)
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if name.endswith("_gates") or name.endswith("ve_gate"):
                p.zero_()
        plain = SpeedrunGPT(config())
        missing = plain.load_state_dict(gated.state_dict(), strict=False).unexpected_keys
        gates = ["blocks.0.mixer.ve_gate", "blocks.3.mixer.ve_gate", "skip_gates"]
        assert sorted(missing) == gates  # layers 0 and 3 have value embeddings (n = 1)
        idx = documents(2, 16, [(0, 5)])
        torch.testing.assert_close(gated(idx), plain(idx))
    scalars = {n for n, _ in gated.optimizer_groups()["scalar"]}
    assert set(gates) <= scalars


@pytest.mark.parametrize("converter", ["fused_mlp", "fp8_mlp"])
def test_mlp_converters_skip_mlp_free_layers(converter):
    model = SpeedrunGPT(config(mlp_free_layers=[0]))
    apply_converters(model, KernelsConfig(converters=[converter]))
    assert model.blocks[0].mlp is None
    assert all(type(b.mlp).__name__ in ("FusedMLP", "FP8MLP") for b in model.blocks[1:])
    assert "blocks.0.mlp.fc.weight" not in dict(model.named_parameters())


def test_tied_embed_head_starts_equal_and_unties_without_changing_the_model():
    """Tied: the token table starts as a copy of the head (which starts as the hidden matrices
    do); untying scales every row to RMS 1, which the normalised lookup does not see."""
    torch.manual_seed(0)
    model = SpeedrunGPT(config(tie_embed_head=True, n_embd=64))
    copy, master = model.tied_weights()
    assert copy is model.embed.weight and master is model.lm_head.weight
    assert copy is not master and torch.equal(copy, master)
    torch.testing.assert_close(master.std().item(), 0.5 / 64**0.5, rtol=0.02, atol=0)
    # two Parameters in their usual groups: the optimizer folds the copy's gradient in
    groups = {k: [n for n, _ in v] for k, v in model.optimizer_groups().items()}
    assert groups["head"] == ["lm_head.weight"] and groups["embed"][0] == "embed.weight"
    assert SpeedrunGPT(config()).tied_weights() is None

    perturbed(model)
    with torch.no_grad():
        model.embed.weight.copy_(model.lm_head.weight)
    idx = documents(2, 24, [(0, 5), (1, 11)])
    before = model(idx)
    model.untie_weights()
    rms = model.embed.weight.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms))
    torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)
    # the FP8 head converters keep the head's Parameter, so the pair stays the model's
    apply_converters(model, KernelsConfig(converters=["fp8_head_loss"]))
    assert model.tied_weights()[1] is model.lm_head.weight is master


def test_prefix_tokens_are_the_longest_proper_prefixes_in_the_vocabulary():
    from muongpt.data.tokenizer import GPT2_VOCAB_SIZE, get_tokenizer, prefix_tokens

    enc = get_tokenizer()
    table = prefix_tokens()
    assert table.shape == (GPT2_VOCAB_SIZE,)
    ids = {enc.decode_single_token_bytes(i): i for i in range(GPT2_VOCAB_SIZE - 1)}
    for token, i in ids.items():
        longest = next(
            (ids[token[:k]] for k in range(len(token) - 1, 0, -1) if token[:k] in ids), -1
        )
        assert table[i] == longest, (token, i)
    assert table[50256] == -1 and (table >= 0).sum() == 50000  # all but the 256 bytes and EOT
    assert enc.decode([table[enc.encode_ordinary(" hello")[0]]]) == " hell"


def test_prefix_loss_adds_the_weighted_prefix_cross_entropy_in_training_only():
    """loss = CE(target) + w CE(prefix token of the target), over the same (padded, capped)
    logits, averaged over the positions with a target; evaluation is the plain next-token CE."""
    from muongpt.data.tokenizer import prefix_tokens

    V = 50257
    model = speedrun(vocab_size=V, bos_token=50256, bigram_rows=0, prefix_loss_weight=0.3)
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    targets[0, :8] = torch.randint(5000, V - 1, (8,), generator=torch.Generator().manual_seed(2))
    targets[1, 3] = -1  # ignored
    seen = {}
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    loss = model(idx, targets)
    head = model.lm_head
    logits = head.cap(head.project(rms_norm(seen["x"])).float()).view(-1, head.out_features)
    prefix = torch.from_numpy(prefix_tokens())[targets.clamp(min=0)].view(-1)
    t = targets.view(-1)
    ce = F.cross_entropy(logits, t, ignore_index=-1, reduction="sum")
    prefix = torch.where((t >= 0) & (prefix >= 0), prefix, -1)
    assert (prefix >= 0).sum() >= 8  # the long tokens have prefixes; the bytes have none
    ce_prefix = F.cross_entropy(logits, prefix, ignore_index=-1, reduction="sum")
    expected = (ce + 0.3 * ce_prefix) / (t >= 0).sum()
    torch.testing.assert_close(loss, expected)
    # the FP8 loss head's CPU path (no fp8 there) takes the same two targets
    converted = apply_converters(copy.deepcopy(model), KernelsConfig(["fp8_head_loss"]))
    torch.testing.assert_close(converted(idx, targets), loss)
    model.eval()
    torch.testing.assert_close(model(idx, targets), F.cross_entropy(logits, t, ignore_index=-1))
    with pytest.raises(MuonGPTError, match="prefix_loss_weight"):
        config(prefix_loss_weight=0.3)  # a 300-token vocabulary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefix_targets_on_the_fused_fp8_head_match_the_unfused_fp8_head_on_cuda():
    """With fp8_head_loss the two targets per position (the next token and its prefix token) go
    to the fused kernel: the loss and the gradients match the unfused FP8 head's
    (test_fp8_loss's bounds: the unfused path rounds the logit gradient twice)."""
    V = 50257
    model = speedrun(
        vocab_size=V, bos_token=50256, bigram_rows=0, n_embd=128, prefix_loss_weight=0.3
    )
    fused = apply_converters(copy.deepcopy(model), KernelsConfig(["fp8_head_loss"])).cuda()
    unfused = apply_converters(model, KernelsConfig(["fp8_head"])).cuda()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V - 1, (2, 256), generator=g).cuda()
    targets = torch.randint(0, V - 1, (2, 256), generator=g).cuda()
    losses = []
    for m in (fused, unfused):
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    for name in ("lm_head.weight", "embed.weight"):
        a, b = fused.get_parameter(name).grad, unfused.get_parameter(name).grad
        assert relative_error(a, b) < 0.03, name


def test_bf16_tables_round_the_lookup_tables_and_train_them_in_bf16():
    """``bf16_tables`` stores the value-embedding and bigram tables in bf16, the same Parameter
    objects: the model computes what the fp32 model with those tables rounded computes, the
    tables' gradients are bf16 (the fp32 model's to bf16 precision), and AdamW moves them."""
    from muongpt.optim.combined import build_optimizer

    model = speedrun(seed=3)
    reference = copy.deepcopy(model)
    tables = [model.value_embeds[0].weight, model.bigram_embed.weight]
    with torch.no_grad():
        for w in (reference.value_embeds[0].weight, reference.bigram_embed.weight):
            w.copy_(w.to(torch.bfloat16).float())
    ids = {id(p) for p in model.parameters()}
    apply_converters(model, KernelsConfig(["bf16_tables"]))
    assert {id(p) for p in model.parameters()} == ids
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert [n for n, d in dtypes.items() if d == torch.bfloat16] == [
        "value_embeds.0.weight",
        "bigram_embed.weight",
    ]
    assert all(d in (torch.bfloat16, torch.float32) for d in dtypes.values())

    idx = documents(2, 24, [(0, 9), (1, 0)])
    targets = documents(2, 24, [(1, 3)], seed=1)
    loss, ref_loss = model(idx, targets), reference(idx, targets)
    assert torch.equal(loss, ref_loss)  # the same model with rounded tables
    loss.backward()
    ref_loss.backward()
    for name in ("value_embeds.0.weight", "bigram_embed.weight"):
        got, want = model.get_parameter(name).grad, reference.get_parameter(name).grad
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-5)

    before = [t.detach().clone() for t in tables]
    build_optimizer(model, {"name": "muon"}).step()
    for t, old in zip(tables, before):
        assert t.dtype == torch.bfloat16 and not torch.equal(t, old)


def test_bf16_table_sums_its_gradient_in_fp32():
    """A row looked up 10,000 times with gradient 0.001 each gets 10 (summed in bf16: 0.5)."""
    from muongpt.kernels.bf16_tables import BF16Table

    table = BF16Table(torch.nn.Embedding(10, 4))
    idx = torch.zeros(10_000, dtype=torch.long)
    idx[::7] = 3
    (table(idx).float().sum() * 0.001).backward()
    grad = table.weight.grad
    assert grad.dtype == torch.bfloat16
    assert torch.equal(grad[0], torch.full((4,), 8571 * 0.001).bfloat16())
    assert torch.equal(grad[3], torch.full((4,), 1429 * 0.001).bfloat16())
    assert not grad[[1, 2, 4, 5, 6, 7, 8, 9]].any()


def test_bf16_tables_adamw_state_is_bf16_and_the_converter_needs_tables():
    from muongpt.model.gpt import GPT, GPTConfig
    from muongpt.optim.combined import build_optimizer

    model = apply_converters(speedrun(), KernelsConfig(["bf16_tables"]))
    idx = documents(1, 16, [(0, 4)])
    model(idx, idx).backward()
    opt = build_optimizer(model, {"name": "muon"})
    opt.step()
    table = model.bigram_embed.weight
    adamw = next(o for o in opt.optimizers if table in o.state)
    assert {v.dtype for v in adamw.state[table].values() if v.ndim > 0} == {torch.bfloat16}
    with pytest.raises(MuonGPTError, match="bf16_tables needs value-embedding or bigram tables"):
        apply_converters(
            GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2)), KernelsConfig(["bf16_tables"])
        )


def integer_table_case(rows: int, D: int, seed: int = 0):
    """Ids with a frequent one spanning several of the kernel's chunks, whole chunks of one id,
    runs ending at chunk edges, the first and last rows, a count that is no multiple of a chunk;
    integer gradients, whose fp32 sums are exact in any order."""
    from muongpt.kernels.bf16_tables import CHUNK

    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.full((5 * CHUNK + 3,), 7),
            torch.randint(0, rows, (7 * CHUNK,), generator=g),
            torch.tensor([0, rows - 1] * 3),
        ]
    )
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    edges = torch.tensor([3] * CHUNK + [4] * CHUNK + [5] * 2 * CHUNK + [6])  # aligned runs
    ids = torch.cat([ids, edges]).view(1, -1)
    grad = torch.randint(-4, 5, (*ids.shape, D), generator=g).to(torch.bfloat16)
    return ids, grad


@pytest.fixture
def narrow_table_blocks(monkeypatch):
    """16 columns per program: the interpreter runs a scan's combine once per element."""
    monkeypatch.setattr("muongpt.kernels.bf16_tables.BLOCK_D", 16)


@needs_interpreter
def test_segmented_table_grad_equals_the_dense_sum(narrow_table_blocks):
    """The touched-rows sum (sort, segmented scan per chunk, crossing runs through fp32 rows)
    against the dense fp32 table rounded: bit for bit on integer gradients (exact sums in any
    order), within one bf16 ulp on random ones (fp32 additions in another order)."""
    from muongpt.kernels.bf16_tables import dense_table_grad, segmented_table_grad

    rows, D = 50, 24  # two column blocks, the second partial
    ids, grad = integer_table_case(rows, D)
    assert torch.equal(segmented_table_grad(ids, grad, rows), dense_table_grad(ids, grad, rows))
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(grad.shape, generator=g)
    got, want = segmented_table_grad(ids, noisy, rows), dense_table_grad(ids, noisy, rows)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)


def table_loss(table, ids, grad):
    """A loss whose gradient at the lookup's output is ``grad``."""
    return (table(ids).float() * grad.float()).sum()


@needs_interpreter
def test_segmented_table_grads_converter_trains_the_tables_as_the_dense_sum(narrow_table_blocks):
    """``segmented_table_grads`` after ``bf16_tables``: the speed-run model's loss and table
    gradients are those of the dense sum (to one bf16 ulp); a compiled lookup runs the op in its
    compiled backward with the same result; without ``bf16_tables`` first, a one-line error."""
    from muongpt.kernels.bf16_tables import BF16Table

    dense = apply_converters(speedrun(seed=3), KernelsConfig(["bf16_tables"]))
    model = apply_converters(
        speedrun(seed=3), KernelsConfig(["bf16_tables", "segmented_table_grads"])
    )
    assert model.bigram_embed.segmented and not dense.bigram_embed.segmented
    idx = documents(2, 24, [(0, 9), (1, 0)])
    targets = documents(2, 24, [(1, 3)], seed=1)
    loss, want = model(idx, targets), dense(idx, targets)
    assert torch.equal(loss, want)
    loss.backward(), want.backward()
    for name in ("value_embeds.0.weight", "bigram_embed.weight"):
        got, ref = model.get_parameter(name).grad, dense.get_parameter(name).grad
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-5)

    ids, grad = integer_table_case(50, 16)
    tables = [BF16Table(torch.nn.Embedding(50, 16)) for _ in range(2)]
    tables[1].weight.data.copy_(tables[0].weight.data)
    tables[1].segmented = True
    for table, run in zip(tables, (table_loss, torch.compile(table_loss))):
        run(table, ids, grad).backward()
    assert torch.equal(tables[1].weight.grad, tables[0].weight.grad)
    with pytest.raises(MuonGPTError, match="segmented_table_grads comes after bf16_tables"):
        apply_converters(speedrun(), KernelsConfig(["segmented_table_grads"]))


@needs_gpu  # with CUDA but no Triton the op is the dense sum itself: nothing compared
def test_segmented_table_grad_equals_the_dense_sum_on_cuda_at_the_speed_runs_size():
    """The bigram table's shape (251,520 x 768) and a step's 65,536 ids (the frequent ones
    spanning many chunks), integer gradients: bit for bit."""
    from muongpt.kernels.bf16_tables import dense_table_grad, segmented_table_grad

    g = torch.Generator().manual_seed(0)
    rows, D = 251_520, 768
    ids = torch.randint(0, rows, (65_536,), generator=g)
    ids[::5] = 11  # a frequent id: 13,108 of them
    ids = ids.view(1, -1).cuda()
    grad = torch.randint(-4, 5, (1, 65_536, D), generator=g).to(torch.bfloat16).cuda()
    assert torch.equal(segmented_table_grad(ids, grad, rows), dense_table_grad(ids, grad, rows))
