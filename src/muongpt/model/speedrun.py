"""The speed-run GPT: the core GPT plus the parts that won modded-nanogpt's speed runs.

    x = x0 = rmsnorm(embed(idx))                        # bf16 under autocast (residual stream)
    for block i:
        x = x + w_i * skip[L-1-i]            (second half: U-net skips from the first half)
        x = x + lambda_i * bigram(prev token, token)    # hashed table, zero at start
        x = a_i x + b_i x0                              # x0 mixing
        x = x + attn_i(norm(x))                         # document-masked, sliding window;
                                                        # v <- a v + b ve(idx) in the first and
                                                        # last n layers (value embeddings)
        x = x + mlp(norm(x))
    x = x - lambda * x_k                                # backout of the stream after k blocks
                                                        # (x = the lanes' mean, parallel residuals)
    logits = A sigmoid((lm_head(norm(x)) + C) / B)      # sigmoid soft-cap, fp32

Each part is plain code below, on in every speed-run model:

- **value embeddings** (``value_embeds`` = n tables): table i is mixed into the attention values of
  layer i and of layer L - n + i (a, b learned, start at 0.5).
- **U-net skips**: the first L/2 blocks' outputs are added back, last in first out, to the inputs
  of the last L/2 blocks, each with a learned weight (starts at 1); ``skip_pairs`` lists other
  (from, to) pairs instead, e.g. ``[[4, 7]]`` alone (modded-nanogpt, November 2025), or none.
- **x0 mixing**: every block first mixes in the embedding output (a = 1, b = 0 at start).
- **bigram table** (``bigram_rows``): a hashed (previous, current) token table; a token with no
  predecessor (a row's first token, a document's first token) reads a reserved row.
- **backout** (``backout_after`` = k): the head reads less of the early layers' raw features.
- **document-masked attention with long/short sliding windows**: documents start at the
  end-of-text token; each layer's window is its ``window_pattern`` fraction of the current window
  (``set_attn_window``: the trainer grows it over the run without recompiling). Masks are dense
  bool tensors for SDPA unless the ``flex_attention`` converter selects FlexAttention block masks.
- **half-truncated RoPE** (``rope_base``): half the head dims rotate, the other half carry no
  position; the softmax scale is ``attn_scale``.
- **key offset**: in the long-window layers the keys' unrotated dims hold the previous token's,
  so one layer can find "the token after an earlier copy of me" (an induction head).
- **MLP-only layers**: a ``mixing.pattern`` entry ``none`` leaves a block without attention.
- **embedding norm** and a **bf16 residual stream** under bf16 autocast (autocast alone keeps it
  fp32: the embedding output is fp32 and fp32 + bf16 stays fp32).

Ten parts are off in the model's defaults, so that stored configs keep their models;
``experiment=speedrun_bench`` turns on the three that measured better there (docs/speedrun.md):

- **paired-head attention** (``paired_head_layers``): in those layers heads 2h and 2h+1 form one
  head over a sequence twice as long, token t's two keys, queries and values at positions 2t and
  2t + 1, so each query scores both representations of every earlier token in one softmax
  (modded-nanogpt, January 2026). Masks, windows and the decoding cache count those positions.
- **input gates** (``gate_dims`` = k > 0): the value embeddings and the U-net skips are scaled by
  gates read from their input, g = 2 sigmoid(w . x[:k]), one per head for a value embedding
  (x the attention input) and one per skip (x the stream, its first k dims RMS-normalised), so a
  token can take more or less of each shortcut (modded-nanogpt, late 2025). w starts at zero:
  every gate starts at 1, the ungated model. On in ``speedrun_bench`` (k = 12).
- **MLP-free layers** (``mlp_free_layers``): those blocks have attention and no MLP (modded-nanogpt
  dropped its first layer's MLP in 2025), a twelfth of d12's MLP work each. ``[0]`` in
  ``speedrun_bench``.
- **learnable exclusive attention** (``exclusive_attention``): each head's output loses a learned
  share of its component along the token's own value, y <- y - tanh(a_h) (y . v^) v^ with
  v^ = v / |v| (XSA, arXiv:2603.09078; learnable per head as in modded-nanogpt, May
  2026), so attention carries what the token does not already hold. a starts at 0 (plain
  attention).
- **tied embedding and head** (``tie_embed_head``): while the run keeps them tied
  (``training.untie_embed_head_frac``), the token embedding table E and the lm_head's weight W
  (V, D) are one weight: x0 = rmsnorm(E[idx]), logits = cap(rmsnorm(x) W^T) with E = W, trained
  by the head's AdamW on dL/dW + dL/dE, so every token's row also learns from every position's
  prediction. W starts as the hidden matrices do (std 0.5 / sqrt(D)) and E as its copy; they are
  two Parameters kept equal (``tied_weights``), so untying changes no compiled graph. At the
  untie every row of E is scaled to RMS 1 (``untie_weights``; the lookup is normalised, so
  nothing the model computes changes) and E trains on as a table at the embedding lr, its AdamW
  starting from the head's moments (``CombinedOptimizer.untie``)
  (modded-nanogpt re-tied its head in December 2025 and untied it at 2/3 of the run later). Tied
  throughout in ``speedrun_bench``.
- **prefix-token prediction** (``prefix_loss_weight`` = w > 0; GPT-2 vocabulary): in training the
  same logits also predict the target's prefix token, the token whose bytes are the longest
  proper prefix of the target's (" hello" -> " hell"; ``data.tokenizer.prefix_tokens``): loss =
  CE(target) + w CE(prefix), over the positions with a target (a target with no prefix token
  adds nothing). Evaluation scores the next token alone (modded-nanogpt, July 2026).
- **parallel residuals** (``parallel_from`` = p > 0): from block p on the stream is two lanes,
  x and u (both the stream at p at first); attention reads x, the MLP reads u, and each adds its
  output y to both lanes with its own weights: x <- x + w_0 y, u <- u + w_1 y (attention),
  x <- x + w_2 y, u <- u + w_3 y (MLP), every w starting at 1 (the sequential block while the
  lanes agree). Skips, the bigram table and x0 mixing apply to both lanes; the head reads their
  mean (modded-nanogpt, February 2026, from block 7 of 11).
- **residual scale at init** (``residual_scale_init`` = s, default 1): the x0 mixing's a_i start
  at s. Unrolled, x = sum_i (prod_{j>i} a_j) y_i + ..., so block i's output y_i reaches the head
  scaled by s^(L-1-i) at the start: s > 1 weights the early blocks' writes more, s < 1 decays
  them (modded-nanogpt started a at 1.1 in November 2025).
- **dynamic dense connections** (``dense_layers``, ``dense_sources``; needs ``gate_dims`` = k):
  the input of each listed block t also takes a per-token mix of earlier streams h_s (s = 0:
  x0; s > 0: the stream after s blocks), x <- x + sum_s (c_ts + w_ts . n) h_s with n the first
  k dims of x RMS-normalised, after the skips and the bigram table. c and w start at zero (the
  plain model). A single-way, linear form of MUDD (Xiao et al. 2025, arXiv:2502.12170), which
  modded-nanogpt put on its last two blocks in April 2026.
- **window extension for evaluation** (``eval_window_factor`` = s > 1): in eval mode every window
  is s times the training one, each layer's RoPE is stretched past its trained window
  (``Rotary.stretched``, YaRN) and the softmax scale is multiplied by (0.1 ln s + 1)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError
from muongpt.data.tokenizer import GPT2_VOCAB_SIZE, prefix_tokens
from muongpt.model.attention import (
    CausalSelfAttention,
    KVCache,
    cached_attention,
    masked_attention,
    matmul_dtype,
    rms_norm,
)
from muongpt.model.gpt import GPT, MLP, GPTConfig, SoftCap, documents
from muongpt.model.masks import UNBOUNDED_WINDOW

# The 12-layer window pattern of the speed runs: long windows at layers 0, 4, 7 and 11.
D12_WINDOWS = [1.0, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 1.0]


@dataclass
class SpeedrunConfig(GPTConfig):
    name: str = "speedrun"
    rope_base: float = 1024.0  # of the rotated half of the head dims
    value_embeds: int = 3  # tables, for the first n and the last n attention layers
    bigram_rows: int = 251520  # rows of the hashed (previous, current) table (5 x 50,304); 0 = none
    backout_after: int = 8  # subtract lambda * (stream after this many blocks); 0 = none
    attn_window: int = 1792  # sliding window in tokens at the end of the run; 0 = full causal
    window_pattern: list[float] = field(default_factory=lambda: list(D12_WINDOWS))
    attn_scale: float = 0.12  # softmax scale; 0 = 1 / sqrt(head_dim)
    sigmoid_cap: list[float] = field(default_factory=lambda: [30.0, 7.5, 0.0])  # A, B, C
    eval_window_factor: float = 1.0  # eval mode: every window times this, RoPE YaRN-stretched
    paired_head_layers: list[int] = field(default_factory=list)  # layers with head pairs fused
    gate_dims: int = 0  # leading input dims read by the value-embedding and skip gates; 0 = none
    exclusive_attention: bool = False  # remove a learned share of each output along its own value
    mlp_free_layers: list[int] = field(default_factory=list)  # blocks without an MLP
    tie_embed_head: bool = False  # token embedding = lm_head while training.untie_embed_head_frac
    prefix_loss_weight: float = 0.0  # training loss += w CE(logits, prefix token of the target)
    parallel_from: int = 0  # first block of two residual lanes (parallel residuals); 0 = none
    residual_scale_init: float = 1.0  # every block's a in x <- a x + b x0, at init
    skip_pairs: list[list[int]] | None = None  # [from, to] blocks; None = the U-net's L/2 pairs
    dense_layers: list[int] = field(default_factory=list)  # blocks taking earlier streams
    dense_sources: list[int] = field(default_factory=list)  # 0 = x0, s = stream after s blocks

    mixers = ("attention", "none")

    def __post_init__(self):
        super().__post_init__()
        if self.logit_softcap:
            raise MuonGPTError(
                "model.logit_softcap (tanh) is for model=gpt; model=speedrun caps logits with "
                "model.sigmoid_cap"
            )
        if len(self.sigmoid_cap) != 3 or min(self.sigmoid_cap[:2]) <= 0:
            raise MuonGPTError(
                f"model.sigmoid_cap must be [A > 0, B > 0, C] of A sigmoid((x + C) / B), "
                f"got {list(self.sigmoid_cap)}"
            )
        if (self.n_embd // self.n_head) % 4:
            raise MuonGPTError(
                f"model=speedrun needs a head dim divisible by 4 (half-truncated RoPE), got "
                f"{self.n_embd} / {self.n_head}"
            )
        if self.attn_window < 0:
            raise MuonGPTError(f"model.attn_window must be >= 0, got {self.attn_window}")
        if not self.window_pattern or any(not 0 < f <= 1 for f in self.window_pattern):
            raise MuonGPTError(
                f"model.window_pattern entries must be in (0, 1], got {list(self.window_pattern)}"
            )
        if self.attn_scale < 0:
            raise MuonGPTError(f"model.attn_scale must be >= 0, got {self.attn_scale}")
        if self.eval_window_factor < 1 or (self.eval_window_factor > 1 and not self.attn_window):
            raise MuonGPTError(
                "model.eval_window_factor must be >= 1, and > 1 only with a sliding window "
                f"(model.attn_window > 0); got {self.eval_window_factor} with attn_window "
                f"{self.attn_window}"
            )
        for i in self.paired_head_layers:
            if not 0 <= i < self.n_layer or self.mixer_of_layer(i) != "attention":
                raise MuonGPTError(
                    f"model.paired_head_layers: {i} is not an attention layer of this model "
                    f"(layers 0..{self.n_layer - 1}, pattern {list(self.mixing.pattern)})"
                )
        for i in self.mlp_free_layers:
            if not 0 <= i < self.n_layer or self.mixer_of_layer(i) != "attention":
                raise MuonGPTError(
                    f"model.mlp_free_layers: {i} is not an attention layer of this model "
                    f"(layers 0..{self.n_layer - 1}, pattern {list(self.mixing.pattern)}); a block "
                    "needs attention or an MLP"
                )
        pairs = self.skips()
        targets = [pair[1] for pair in pairs]
        if any(
            len(pair) != 2 or not 0 <= pair[0] < pair[1] < self.n_layer for pair in pairs
        ) or len(set(targets)) < len(targets):
            raise MuonGPTError(
                "model.skip_pairs must be [from, to] block pairs with from < to < n_layer = "
                f"{self.n_layer}, one per target block, got {self.skip_pairs}"
            )
        if not self.residual_scale_init > 0:
            raise MuonGPTError(
                f"model.residual_scale_init must be > 0, got {self.residual_scale_init}"
            )
        if bool(self.dense_layers) != bool(self.dense_sources) or (
            self.dense_layers and not self.gate_dims
        ):
            raise MuonGPTError(
                "model.dense_layers and model.dense_sources go together, and need "
                f"model.gate_dims > 0 (got {list(self.dense_layers)}, {list(self.dense_sources)}, "
                f"gate_dims {self.gate_dims})"
            )
        if self.dense_layers and (
            min(self.dense_sources) < 0
            or max(self.dense_sources) >= min(self.dense_layers)
            or max(self.dense_layers) >= self.n_layer
            or len(set(self.dense_layers)) < len(self.dense_layers)
            or list(self.dense_sources) != sorted(set(self.dense_sources))
        ):
            raise MuonGPTError(
                "model.dense_sources must be ascending streams before the first of "
                f"model.dense_layers (distinct blocks < n_layer = {self.n_layer}), got sources "
                f"{list(self.dense_sources)} for layers {list(self.dense_layers)}"
            )
        if not 0 <= self.parallel_from < self.n_layer:
            raise MuonGPTError(
                f"model.parallel_from must be in [0, n_layer = {self.n_layer}) (0 = one residual "
                f"stream), got {self.parallel_from}"
            )
        if self.paired_head_layers and self.n_head % 2:
            raise MuonGPTError(
                f"model.paired_head_layers needs an even model.n_head, got {self.n_head}"
            )
        if self.prefix_loss_weight < 0 or (
            self.prefix_loss_weight and self.vocab_size != GPT2_VOCAB_SIZE
        ):
            raise MuonGPTError(
                f"model.prefix_loss_weight must be >= 0, and > 0 only with the GPT-2 vocabulary "
                f"({GPT2_VOCAB_SIZE} tokens); got {self.prefix_loss_weight} with "
                f"{self.vocab_size} tokens"
            )
        if not 0 <= self.gate_dims <= self.n_embd:
            raise MuonGPTError(
                f"model.gate_dims must be in [0, n_embd = {self.n_embd}], got {self.gate_dims}"
            )
        if self.bigram_rows < 0 or self.bigram_rows == 1:
            raise MuonGPTError(
                f"model.bigram_rows must be 0 (none) or >= 2, got {self.bigram_rows}"
            )
        if not 0 <= self.backout_after < self.n_layer:
            raise MuonGPTError(
                f"model.backout_after must be in [0, n_layer = {self.n_layer}), got "
                f"{self.backout_after} (the speed-run defaults are d12's)"
            )
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise MuonGPTError(
                f"model.value_embeds must be in [0, n_layer / 2 = {self.n_layer // 2}], got "
                f"{self.value_embeds} (the speed-run defaults are d12's)"
            )

    @property
    def masks_documents(self) -> bool:  # always: documents and windows are in every mask
        return True

    def skips(self) -> list[tuple[int, int]]:
        """The (from, to) block pairs of the skips: block ``from``'s output joins block ``to``'s
        input; by default the U-net's, (L/2 - 1 - j, L - L/2 + j) for j < L/2."""
        if self.skip_pairs is not None:
            return [tuple(pair) for pair in self.skip_pairs]
        n = self.n_layer // 2
        return [(n - 1 - j, self.n_layer - n + j) for j in range(n)]

    def window_of_layer(self, i: int) -> float:
        return float(self.window_pattern[i % len(self.window_pattern)])

    def layer_window(self, i: int, window: int) -> int:
        """Layer i's share of a ``window``-token window: its fraction, truncated, at least one
        token (the rule ``SpeedrunGPT.masks`` applies to the window tensor)."""
        return max(int(window * self.window_of_layer(i)), 1)

    def paired_heads_of_layer(self, i: int) -> bool:
        return i in self.paired_head_layers

    def key_offset_of_layer(self, i: int) -> bool:
        """The key offset applies to the long-window layers (the largest window fraction)."""
        return self.window_of_layer(i) == max(self.window_pattern)

    def value_embed_of_layer(self, i: int) -> int | None:
        """The value-embedding table of layer i (first n and last n attention layers), or None."""
        n = self.value_embeds
        if self.mixer_of_layer(i) != "attention" or n == 0:
            return None
        if i < n:
            return i
        if i >= self.n_layer - n:
            return i - (self.n_layer - n)
        return None


BIGRAM_MULTIPLIERS = (40503, 65599)  # odd, so both tokens spread over every row


def bigram_rows(
    idx: Tensor, rows: int, prev: Tensor | None = None, doc_start: int | None = None
) -> Tensor:
    """Row of each (previous, current) token pair in a ``rows``-row table: a multiplicative hash
    of the pair into rows 0 .. rows - 2. A token with no previous one reads the reserved last
    row: the first of ``idx`` when ``prev`` (B, 1) is not given, and every ``doc_start`` token
    (so that no document sees the one before it)."""
    a, b = BIGRAM_MULTIPLIERS
    cur = idx.long()
    first = torch.full_like(cur[:, :1], -1) if prev is None else prev.long()  # -1: none
    before = torch.cat([first, cur[:, :-1]], dim=1)
    h = torch.bitwise_xor(cur * a, before * b) % (rows - 1)
    no_predecessor = before < 0
    if doc_start is not None:
        no_predecessor |= cur == doc_start
    return torch.where(no_predecessor, rows - 1, h)


def input_gate(x: Tensor, weight: Tensor, gates: int) -> Tensor:
    """2 sigmoid(x[..., :k] . w_g) for each of ``gates`` gates: (..., gates), 1 where w = 0.
    ``weight`` is flat (gates * k,), so that the optimizer treats it as scalars."""
    k = weight.numel() // gates
    return 2 * torch.sigmoid(x[..., :k] @ weight.view(gates, k).to(x.dtype).t())


def pair_heads(x: Tensor) -> Tensor:
    """(B, T, H, hd) -> (B, 2T, H/2, hd): head 2h + j of token t at position 2t + j of head h."""
    B, T, H, hd = x.shape
    return x.view(B, T, H // 2, 2, hd).transpose(2, 3).reshape(B, 2 * T, H // 2, hd)


def unpair_heads(y: Tensor) -> Tensor:
    """The inverse of ``pair_heads``: (B, 2T, H/2, hd) -> (B, T, H, hd)."""
    B, T2, H2, hd = y.shape
    return y.view(B, T2 // 2, 2, H2, hd).transpose(2, 3).reshape(B, T2 // 2, 2 * H2, hd)


def offset_keys(k: Tensor, cache: KVCache | None) -> Tensor:
    """Shift the unrotated dims of the keys (B, T, H, hd) one token later: with a half-truncated
    RoPE those are the last quarter of each half, [hd/4, hd/2) and [3hd/4, hd). The first token
    gets zeros there (or, decoding, the cached last key's)."""
    B, T, H, hd = k.shape
    halves = k.view(B, T, H, 2, hd // 2)
    rotated, still = halves[..., : hd // 4], halves[..., hd // 4 :]
    first = torch.zeros_like(still[:, :1])
    if cache is not None:
        if cache.last_key is not None:
            first = cache.last_key
        cache.last_key = still[:, -1:]
    shifted = torch.cat([first, still[:, :-1]], dim=1)
    return torch.cat([rotated, shifted], dim=-1).view(B, T, H, hd)


class SpeedrunAttention(CausalSelfAttention):
    """Causal attention with half-truncated RoPE, a document/window mask, an optional value
    embedding (v <- a v + b ve) and an optional key offset."""

    def __init__(self, config: SpeedrunConfig, layer: int):
        super().__init__(config.n_embd, config.n_head, config.rope_base, rope_truncate=True)
        self.key_offset = config.key_offset_of_layer(layer)
        self.paired = config.paired_heads_of_layer(layer)
        self.scale = config.attn_scale or None  # None: 1 / sqrt(head_dim)
        has_ve = config.value_embed_of_layer(layer) is not None
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if has_ve else None
        gated = has_ve and config.gate_dims > 0
        self.ve_gate = nn.Parameter(torch.zeros(self.n_head * config.gate_dims)) if gated else None
        exclusive = config.exclusive_attention
        self.xsa_logits = nn.Parameter(torch.zeros(self.n_head)) if exclusive else None
        # window extension in eval mode: RoPE stretched past the trained window, and YaRN's
        # logit temperature (0.1 ln s + 1)^2 for the softmax over s times more keys
        factor = config.eval_window_factor
        self.eval_rotary, self.eval_scale = None, None
        if factor > 1:
            trained = config.layer_window(layer, config.attn_window)
            if self.paired:  # the window counts two positions per token
                trained = max(trained // 2, 1)
            self.eval_rotary = self.rotary.stretched(factor, trained)
            temperature = (0.1 * math.log(factor) + 1) ** 2
            self.eval_scale = (self.scale or self.head_dim**-0.5) * temperature

    def forward(
        self, x: Tensor, mask=None, ve: Tensor | None = None, cache=None, window: int = 0
    ) -> Tensor:
        """``mask``: the whole-sequence mask (training, evaluation); ``cache`` and ``window``:
        decoding, with the training window (0 = unbounded)."""
        B, T, D = x.shape
        extended = not self.training and self.eval_rotary is not None
        rotary, scale = (self.eval_rotary, self.eval_scale) if extended else (None, self.scale)
        start = 0 if cache is None else cache.pos // (2 if self.paired else 1)  # in tokens
        q, k = self.query_key(x, start, rotary)
        v = self.heads(self.v(x))
        if self.ve_lambdas is not None:
            ve = self.heads(ve.to(v.dtype))
            if self.ve_gate is not None:  # (B, T, H, 1): one gate per head and token
                ve = ve * input_gate(x, self.ve_gate, self.n_head).unsqueeze(-1)
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve
        own = v  # (B, T, H, hd): each token's own values, for exclusive attention
        if self.key_offset:
            k = offset_keys(k, cache)
        if self.paired:  # (B, 2T, H/2, hd)
            q, k, v = pair_heads(q), pair_heads(k), pair_heads(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is None:
            y = masked_attention(q, k, v, mask, scale)
        else:
            y = cached_attention(q, k, v, cache, window, scale)
        y = y.transpose(1, 2)
        if self.paired:
            y = unpair_heads(y)
        if self.xsa_logits is not None:  # less of what the token already holds
            own = F.normalize(own, dim=-1)
            share = torch.tanh(self.xsa_logits).to(y.dtype).unsqueeze(-1)
            y = y - share * (y * own).sum(-1, keepdim=True) * own
        return self.proj(y.reshape(B, T, D))

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        if not self.paired:
            return super().new_cache(batch_size, max_len, device, dtype)
        return KVCache(batch_size, self.n_head // 2, self.head_dim, 2 * max_len, device, dtype)


class SpeedrunBlock(nn.Module):
    def __init__(
        self,
        mixer: SpeedrunAttention | None,
        mlp: MLP | None,
        lanes: bool = False,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        self.mixer, self.mlp = mixer, mlp
        # x <- a x + b x0 before the block (a scalar-group parameter: no weight decay)
        self.x0_lambdas = nn.Parameter(torch.tensor([residual_scale, 0.0]))
        # parallel residuals: (attention -> x, attention -> u, MLP -> x, MLP -> u)
        self.lane_weights = nn.Parameter(torch.ones(4)) if lanes else None

    def forward(
        self, x: Tensor, x0: Tensor, mask=None, ve=None, cache=None, window: int = 0, lane=None
    ) -> tuple[Tensor, Tensor | None]:
        """The block on the stream x, or on the lanes (x, ``lane``) of parallel residuals:
        attention reads x, the MLP the lane, each adds to both. Returns (x, lane)."""
        a, b = self.x0_lambdas
        x = a * x + b * x0
        if lane is None:
            if self.mixer is not None:
                x = x + self.mixer(rms_norm(x), mask=mask, ve=ve, cache=cache, window=window)
            return (x if self.mlp is None else x + self.mlp(rms_norm(x))), None
        lane = a * lane + b * x0
        w = self.lane_weights.to(x.dtype)
        if self.mixer is not None:
            y = self.mixer(rms_norm(x), mask=mask, ve=ve, cache=cache, window=window)
            x, lane = x + w[0] * y, lane + w[1] * y
        if self.mlp is not None:
            y = self.mlp(rms_norm(lane))
            x, lane = x + w[2] * y, lane + w[3] * y
        return x, lane


class DecodeState(list):
    """The per-layer caches of incremental decoding, plus the last token (bigram table)."""

    last_token: Tensor | None = None


class SpeedrunGPT(GPT):
    config: SpeedrunConfig
    window_block = 128  # FlexAttention's tile: window schedules round to whole tiles

    def make_mixer(self, layer: int) -> SpeedrunAttention | None:
        if self.config.mixer_of_layer(layer) == "none":
            return None
        return SpeedrunAttention(self.config, layer)

    def make_block(self, layer: int) -> SpeedrunBlock:
        c = self.config
        mlp = None if layer in c.mlp_free_layers else MLP(c.n_embd, c.mlp_ratio)
        lanes = 0 < c.parallel_from <= layer
        return SpeedrunBlock(self.make_mixer(layer), mlp, lanes, c.residual_scale_init)

    def add_parts(self) -> None:
        c = self.config
        self.value_embeds = nn.ModuleList(
            nn.Embedding(c.padded_vocab_size, c.n_embd) for _ in range(c.value_embeds)
        )
        self.bigram_embed = nn.Embedding(c.bigram_rows, c.n_embd) if c.bigram_rows else None
        self.bigram_lambdas = nn.Parameter(torch.full((c.n_layer,), 0.1)) if c.bigram_rows else None
        self.backout_lambda = nn.Parameter(torch.tensor(0.5)) if c.backout_after else None
        n_skips = len(c.skips())
        self.skip_weights = nn.Parameter(torch.ones(n_skips)) if n_skips else None
        gates = n_skips * c.gate_dims
        self.skip_gates = nn.Parameter(torch.zeros(gates)) if gates else None
        mixes = len(c.dense_layers) * len(c.dense_sources)  # one weight per (layer, source)
        self.dense_bias = nn.Parameter(torch.zeros(mixes)) if mixes else None
        self.dense_weights = nn.Parameter(torch.zeros(mixes * c.gate_dims)) if mixes else None
        prefix = None
        if c.prefix_loss_weight:  # each token's prefix token, -1 where it has none
            prefix = torch.full((c.padded_vocab_size,), -1, dtype=torch.long)
            prefix[: c.vocab_size] = torch.from_numpy(prefix_tokens())
        self.register_buffer("prefix_of", prefix, persistent=False)
        # the training loss's weight of each target column: next token, prefix token
        weights = torch.tensor([1.0, c.prefix_loss_weight]) if prefix is not None else None
        self.register_buffer("target_weights", weights, persistent=False)
        # the current window in tokens: a buffer, so that a window schedule does not recompile
        window = torch.tensor(c.attn_window or UNBOUNDED_WINDOW, dtype=torch.int32)
        self.register_buffer("current_window", window, persistent=False)

    def tied_weights(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        return (self.embed.weight, self.lm_head.weight) if self.config.tie_embed_head else None

    @torch.no_grad()
    def untie_weights(self) -> Tensor:
        """Every embedding row to RMS 1, the scale of an untied table: the lookup is normalised,
        so the model computes the same, and the table then trains at the embedding lr. Returns
        each row's factor 1 / rms (V, 1)."""
        w = self.embed.weight
        scale = w.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12).reciprocal()
        w.mul_(scale.to(w.dtype))
        return scale

    def training_targets(self, targets: Tensor) -> Tensor:
        """(B, T) next-token targets -> (B, T, 2) target columns of the training loss: the next
        token and its prefix token (``prefix_loss_weight``), -1 (ignored) where it has none."""
        prefix = torch.where(targets >= 0, self.prefix_of[targets.clamp(min=0)], -1)
        return torch.stack([targets, prefix], -1)

    def make_cap(self) -> SoftCap:
        return SoftCap("sigmoid", *self.config.sigmoid_cap)

    def lookup_tables(self) -> list[nn.Parameter]:
        tables = [self.embed.weight] + [e.weight for e in self.value_embeds]
        return tables + ([self.bigram_embed.weight] if self.bigram_embed is not None else [])

    def zero_init(self) -> list[nn.Parameter]:
        zeros = [] if self.config.tie_embed_head else [self.lm_head.weight]
        for b in self.blocks:
            if b.mlp is not None:
                zeros.append(b.mlp.proj.weight)
            if b.mixer is not None:
                zeros.append(b.mixer.proj.weight)
        return zeros + ([self.bigram_embed.weight] if self.bigram_embed is not None else [])

    def new_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        return DecodeState(super().new_caches(batch_size, max_len, device, dtype))

    def set_attn_window(self, tokens: int) -> None:
        """Sliding attention window from now on (0 = unbounded). No recompilation: the window is
        a buffer read by the mask builder."""
        if tokens < 0:
            raise MuonGPTError(f"attention window must be >= 0, got {tokens}")
        self.current_window.fill_(tokens or UNBOUNDED_WINDOW)

    # ---------------------------------------------------------------- parts
    def masks(self, idx: Tensor) -> dict[tuple[float, bool], object]:
        """One whole-sequence mask per distinct (window fraction, paired heads) of the attention
        layers: causal, within each document (documents start at ``bos_token``), within the
        fraction of the current window; over twice the positions where heads are paired."""
        c = self.config
        docs = documents(idx, c.bos_token)
        now, masks = self.window_now(), {}
        for key in {self.mask_key(i) for i in range(c.n_layer)}:
            fraction, paired = key
            window = now
            if fraction != 1.0:  # a short-window layer: a fraction of the current window
                window = (now * fraction).to(torch.int32).clamp(min=1)
            masks[key] = self.mask_builder(docs.repeat_interleave(2, 1) if paired else docs, window)
        return masks

    def mask_key(self, i: int) -> tuple[float, bool]:
        return self.config.window_of_layer(i), self.config.paired_heads_of_layer(i)

    def window_now(self) -> Tensor:
        """The current window in tokens (0-dim int32): the training window, times
        ``eval_window_factor`` in eval mode."""
        factor = self.config.eval_window_factor
        if self.training or factor == 1:
            return self.current_window
        wider = self.current_window.double() * factor
        return wider.clamp(max=UNBOUNDED_WINDOW).to(torch.int32)

    def decode_window(self) -> int:
        window = int(self.window_now())
        return 0 if window >= UNBOUNDED_WINDOW else window

    def bigrams(self, idx: Tensor, caches: DecodeState | None, dtype: torch.dtype) -> Tensor:
        """The bigram table's rows for ``idx``; decoding continues from the last token seen."""
        prev = None
        if caches is not None:
            prev = caches.last_token
            caches.last_token = idx[:, -1:]
        rows = bigram_rows(idx, self.config.bigram_rows, prev, self.config.bos_token)
        return self.bigram_embed(rows).to(dtype)

    def dense_mix(self, t: int, x: Tensor, streams: list[Tensor]) -> Tensor:
        """sum_s (c_ts + w_ts . rmsnorm(x[..., :k])) h_s for the t-th dense layer: (B, T, D)."""
        k, n = self.config.gate_dims, len(streams)
        w = self.dense_weights[t * n * k : (t + 1) * n * k].view(n, k).to(x.dtype)
        mix = rms_norm(x[..., :k]) @ w.t() + self.dense_bias[t * n : (t + 1) * n].to(x.dtype)
        return sum(mix[..., s, None] * h for s, h in enumerate(streams))

    # ---------------------------------------------------------------- forward
    def forward(
        self, idx: Tensor, targets: Tensor | None = None, caches: DecodeState | None = None
    ):
        """Mean cross-entropy over ``targets`` (ids < 0 are ignored), or fp32 logits (B, T, vocab).
        With ``caches`` (decoding) the prompt counts as one document."""
        c = self.config
        x = self.embed(idx)
        x = x.to(matmul_dtype(x))  # a bf16 residual stream under bf16 autocast
        x = x0 = rms_norm(x)
        ves = [e(idx) for e in self.value_embeds]
        bigram = self.bigrams(idx, caches, x.dtype) if self.bigram_embed is not None else None
        masks = self.masks(idx) if caches is None else {}
        window = self.decode_window() if caches is not None else 0
        pairs = c.skips()
        skip_into = {to: j for j, (_, to) in enumerate(pairs)}  # target block -> its pair
        skip_from, kept = {source for source, _ in pairs}, {}
        early, lane = None, None
        streams = [x0] if 0 in c.dense_sources else []  # the dense connections' sources
        for i, block in enumerate(self.blocks):
            if self.backout_lambda is not None and i == c.backout_after:
                early = x
            if i == c.parallel_from > 0:  # parallel residuals: a second lane from here on
                lane = x
            if i in skip_into:  # an earlier block's output (U-net: first half to second half)
                j = skip_into[i]
                skip = self.skip_weights[j] * kept[pairs[j][0]]
                if self.skip_gates is not None:
                    k = c.gate_dims
                    w = self.skip_gates[j * k : (j + 1) * k]
                    skip = skip * input_gate(rms_norm(x[..., :k]), w, 1)
                x, lane = x + skip, None if lane is None else lane + skip
            if bigram is not None:
                x = x + self.bigram_lambdas[i] * bigram
                lane = None if lane is None else lane + self.bigram_lambdas[i] * bigram
            if i in c.dense_layers:
                dense = self.dense_mix(c.dense_layers.index(i), x, streams)
                x, lane = x + dense, None if lane is None else lane + dense
            v = c.value_embed_of_layer(i)
            x, lane = block(
                x,
                x0,
                mask=masks.get(self.mask_key(i)),
                ve=None if v is None else ves[v],
                cache=None if caches is None else caches[i],
                window=window and c.layer_window(i, window),
                lane=lane,
            )
            if i in skip_from:
                kept[i] = x
            if i + 1 in c.dense_sources:
                streams.append(x)
        if lane is not None:
            x = (x + lane) / 2
        if early is not None:
            x = x - self.backout_lambda * early
        if targets is not None and self.training and self.target_weights is not None:
            return self.lm_head(x, self.training_targets(targets), self.target_weights)
        return self.lm_head(x, targets)
