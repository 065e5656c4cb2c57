"""The GPT model: one readable file, the math visible.

    x = embed(idx)
    for each block:   x = x + mixer(norm(x))      # causal self-attention or PoM
                      x = x + mlp(norm(x))        # relu(x W1)^2 W2, 4x wide
    logits = softcap(lm_head(norm(x)))            # fp32, vocabulary padded to a multiple of 128

RMSNorm has no learned scale, there are no biases, output projections start at zero (each block
begins as the identity), and the lm_head is not tied to the embedding.

Optional speedrun tricks (modded-nanogpt, late 2024 to early 2025), each off by default:

- ``value_embeds = n``: n extra embedding tables; table i is mixed into the attention values of
  layer i and of layer L - n + i:  v <- a v + b ve_i(idx)  (a, b learned, start at 0.5).
- ``unet_skips``: the first L/2 blocks' outputs are added back, last in first out, to the inputs
  of the last L/2 blocks, each with a learned weight (starts at 1).
- ``x0_mix``: every block first mixes in the embedding output: x <- a x + b x0 (a=1, b=0 at start).
- ``attention = "flex"``: FlexAttention with a block mask: causal, plus ``doc_mask`` (a token
  sees only its own document: documents start at the end-of-text token) and ``attn_window``
  (sliding window of that many tokens; 0 = unbounded; ``set_attn_window`` changes it, e.g. a
  schedule that grows it during training). Long packed sequences then cost no more than short
  ones. Decoding with caches uses SDPA with the same window (a prompt is one document).
  ``window_pattern``: each layer's window as a fraction of the current one, cycled over the
  depth ([1.0, 0.5, ...]: long and short layers; one block mask per distinct fraction).
- ``mixer_pattern`` entry ``"none"``: a block with no token mixer, its MLP only.
- ``rope_truncate``: RoPE rotates half the head dims only (frequencies 1 .. 1/rope_base); the
  other half carries no position. ``attn_scale``: softmax scale other than 1/sqrt(head_dim).
- ``residual_bf16``: under bf16 autocast the residual stream itself is bf16 (autocast alone keeps
  it fp32: the embedding output is fp32 and fp32 + bf16 stays fp32). Halves the memory traffic
  of every norm, residual add and saved activation; matmuls are bf16 either way.
- ``smear``: x_t <- x_t + lambda sigmoid(w . x_t[:12]) x_{t-1} on the embedding output (a learned,
  input-gated share of the previous token; lambda starts at 0). ``attn_gate``: each head's output
  times sigmoid(w_h . x[:12]) of the attention input (w_h starts at 0, so the gate at 0.5).
  Both from modded-nanogpt's 2025 records; their tiny gate matrices train with the scalar AdamW.
- ``key_offset`` (needs ``rope_truncate``): in the long-window layers the keys' unrotated dims
  hold the previous token's, so a query can find "the token after an earlier copy of me" in one
  layer (an induction head without a second layer). modded-nanogpt, December 2025.
- ``embed_norm``: x0 = RMSNorm(embed(idx)). Keeps the residual stream at unit scale however far a
  high-lr (AdamW 0.6) embedding drifts; without it the embedding can swamp the blocks' outputs.
- ``bigram_embed = rows``: a hashed table of token pairs, zero at start; before every block
  x <- x + lambda_i E[hash(previous token, token)] (lambda_i learned, start at 0.1). Gives every
  layer a direct bigram statistic (modded-nanogpt, 2026). The first token of a sequence has no
  predecessor and reads a reserved row; decoding keeps the last token in the decode state.
- ``backout_after = k``: before the final norm, x <- x - lambda x_k, x_k the residual stream
  after the first k blocks (lambda learned, starts at 0.5): the head reads less of the early
  layers' raw features (modded-nanogpt, 2025).
- ``fp8_head`` (``model/fp8.py``): the lm_head matmul in fp8; ``fp8_fused_loss``
  (``model/fp8_loss.py``): while training, the head, soft-cap and loss are one op that makes the
  e5m2 logit gradient in the forward pass (same math as the plain path below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError
from muongpt.model import fp8_loss, relu2_mlp
from muongpt.model.attention import (
    GATE_DIMS,
    UNBOUNDED_WINDOW,
    CausalSelfAttention,
    document_block_mask,
    document_dense_mask,
    rms_norm,
)

SOFTCAPS = ("none", "tanh", "sigmoid")
MIXERS = ("attention", "pom", "none")  # "none": the block is its MLP only


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    rope_truncate: bool = False  # rotate only half the head dims (the rest carry no position)
    attn_scale: float = 0.0  # softmax scale of attention; 0 = 1 / sqrt(head_dim)
    # "none", "tanh": c * tanh(x / c), or "sigmoid": A * sigmoid((x + C) / B) (modded-nanogpt)
    logit_softcap: str = "none"
    softcap_value: float = 15.0
    sigmoid_cap: list[float] = field(default_factory=lambda: list(fp8_loss.SIGMOID_CAP))  # A, B, C
    # Token mixer of each layer, cycled over the depth: ["attention"], ["pom"], ["pom", "attention"], ...
    mixer_pattern: list[str] = field(default_factory=lambda: ["attention"])
    pom_degree: int = 2
    pom_expand: int = 2
    pom_n_sel_heads: int = 1
    fp8_head: bool = False
    fp8_scales: list[float] = field(default_factory=lambda: [2.0, 32.0, 2.0**29])  # x, W, grad
    fp8_dw: bool = False  # fp8 head: its weight gradient in fp8 too (else a bf16 matmul)
    # fp8 head: matmul, soft-cap, loss and its e5m2 gradient in one op (model/fp8_loss.py; fp8 dW)
    fp8_fused_loss: bool = False
    fused_mlp: bool = False  # ReLU^2 fused into the MLP's Triton GEMM epilogues (CUDA, bf16)
    value_embeds: int = 0
    unet_skips: bool = False
    x0_mix: bool = False
    embed_norm: bool = False
    smear: bool = False  # token smear: x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1} after embed
    attn_gate: bool = False  # per-head sigmoid gate on attention outputs, from x[:12]
    # long-window layers: the keys' unrotated dims (rope_truncate) shifted one token later
    key_offset: bool = False
    residual_bf16: bool = False
    bigram_embed: int = 0  # rows of the hashed (previous, current) token table; 0 = none
    backout_after: int = 0  # subtract lambda * (stream after this many blocks) at the end; 0 = off
    # multi-token prediction while training: loss weights of the targets t+2, t+3, ... added to
    # the next-token loss (the same logits; the trainer can decay them, training.mtp_decay)
    mtp_weights: list[float] = field(default_factory=list)
    attention: str = "sdpa"  # sdpa | flex
    doc_mask: bool = False  # flex only
    attn_window: int = 0  # flex only; 0 = full causal
    # per-layer fraction of the window, cycled over the depth: [1.0, 0.5] alternates long / short
    window_pattern: list[float] = field(default_factory=lambda: [1.0])
    bos_token: int = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise MuonGPTError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise MuonGPTError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.fp8_fused_loss and not self.fp8_head:
            raise MuonGPTError("model.fp8_fused_loss needs model.fp8_head=true")
        if self.logit_softcap not in SOFTCAPS:
            raise MuonGPTError(
                f"logit_softcap must be one of {SOFTCAPS}, got {self.logit_softcap!r}"
            )
        if len(self.sigmoid_cap) != 3 or min(self.sigmoid_cap[:2]) <= 0:
            raise MuonGPTError(
                f"model.sigmoid_cap must be [A > 0, B > 0, C] of A sigmoid((x + C) / B), "
                f"got {list(self.sigmoid_cap)}"
            )
        if not self.mixer_pattern or any(m not in MIXERS for m in self.mixer_pattern):
            raise MuonGPTError(
                f"mixer_pattern entries must be in {MIXERS}, got {self.mixer_pattern}"
            )
        if self.attention not in ("sdpa", "flex"):
            raise MuonGPTError(f"model.attention must be 'sdpa' or 'flex', got {self.attention!r}")
        if self.attention == "sdpa" and (self.doc_mask or self.attn_window):
            raise MuonGPTError("model.doc_mask and model.attn_window need model.attention=flex")
        if self.attn_window < 0:
            raise MuonGPTError(f"model.attn_window must be >= 0, got {self.attn_window}")
        if not self.window_pattern or any(not 0 < f <= 1 for f in self.window_pattern):
            raise MuonGPTError(
                f"model.window_pattern entries must be in (0, 1], got {self.window_pattern}"
            )
        if self.window_pattern != [1.0] and self.attention != "flex":
            raise MuonGPTError("model.window_pattern needs model.attention=flex")
        if self.attn_scale < 0:
            raise MuonGPTError(f"model.attn_scale must be >= 0, got {self.attn_scale}")
        if self.key_offset and not self.rope_truncate:
            raise MuonGPTError("model.key_offset needs model.rope_truncate (unrotated key dims)")
        if self.bigram_embed < 0 or self.bigram_embed == 1:
            raise MuonGPTError(
                f"model.bigram_embed must be 0 (off) or >= 2 rows, got {self.bigram_embed}"
            )
        if not 0 <= self.backout_after < self.n_layer:
            raise MuonGPTError(
                f"model.backout_after must be in [0, n_layer = {self.n_layer}), "
                f"got {self.backout_after}"
            )
        if any(not w >= 0 for w in self.mtp_weights):
            raise MuonGPTError(f"model.mtp_weights must be >= 0, got {list(self.mtp_weights)}")
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise MuonGPTError(
                f"model.value_embeds must be in [0, n_layer / 2 = {self.n_layer // 2}], "
                f"got {self.value_embeds}"
            )

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 128) * 128  # multiples of 128 keep the head matmul fast

    def mixer_of_layer(self, i: int) -> str:
        return self.mixer_pattern[i % len(self.mixer_pattern)]

    def key_offset_of_layer(self, i: int) -> bool:
        """``key_offset`` applies to the long-window layers (the largest window_pattern entry)."""
        return self.key_offset and self.window_of_layer(i) == max(self.window_pattern)

    def window_of_layer(self, i: int) -> float:
        return float(self.window_pattern[i % len(self.window_pattern)])

    def layer_window(self, i: int, window: int) -> int:
        """Layer i's share of a ``window``-token window: its window_pattern fraction, truncated,
        at least one token (the same rule as ``GPT.block_mask``'s tensor form)."""
        return max(int(window * self.window_of_layer(i)), 1)

    def value_embed_of_layer(self, i: int) -> int | None:
        """Index of the value-embedding table layer i uses (first n and last n layers), or None."""
        n = self.value_embeds
        if self.mixer_of_layer(i) != "attention" or n == 0:
            return None
        if i < n:
            return i
        if i >= self.n_layer - n:
            return i - (self.n_layer - n)
        return None


class DecodeState(list):
    """The per-layer caches of incremental decoding, plus the last token's embedding (smear) and
    the last token itself (bigram_embed)."""

    last_embedding: Tensor | None = None
    last_token: Tensor | None = None


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


def multi_token_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[k] * cross-entropy(logits, targets[:, k]), each summed over its valid rows
    (target >= 0) and divided by the valid rows of the first: (T, V), (T, K), (K,)."""
    valid = targets >= 0
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits.gather(1, targets.clamp(min=0))
    losses = torch.where(valid, lse - picked, 0.0) * weights
    return losses.sum() / valid[:, 0].sum().clamp(min=1)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int, fused: bool = False):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim, bias=False)
        self.proj = nn.Linear(ratio * dim, dim, bias=False)
        self.fused = fused  # ReLU^2 inside the matmuls' epilogues where the GPU allows (relu2_mlp)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and relu2_mlp.fused_mlp_usable(x, self.fc.out_features):
            return relu2_mlp.relu2_mlp(x, self.fc.weight, self.proj.weight)
        return self.proj(F.relu(self.fc(x)).square())  # ReLU^2 (So et al. 2021)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.kind = config.mixer_of_layer(layer)
        if self.kind == "attention":
            self.mixer = CausalSelfAttention(
                config.n_embd,
                config.n_head,
                config.rope_base,
                value_embed=config.value_embed_of_layer(layer) is not None,
                rope_truncate=config.rope_truncate,
                scale=config.attn_scale or None,
                gate=config.attn_gate,
                key_offset=config.key_offset_of_layer(layer),
            )
        elif self.kind == "none":
            self.mixer = None
        else:
            from muongpt.model.pom import PoM

            self.mixer = PoM(
                config.n_embd, config.pom_degree, config.pom_expand, config.pom_n_sel_heads
            )
        self.mlp = MLP(config.n_embd, config.mlp_ratio, config.fused_mlp)
        # x <- a x + b x0 before the block (x0_mix); a scalar-group parameter, no weight decay
        self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mix else None

    def forward(
        self,
        x: Tensor,
        cache=None,
        x0: Tensor | None = None,
        ve: Tensor | None = None,
        mask=None,
        window: int = 0,
    ):
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        extra = {} if ve is None else {"ve": ve}
        if self.kind == "attention":
            if mask is not None:
                extra["block_mask"] = mask
            if cache is not None:
                extra["window"] = window
        if self.mixer is not None:
            x = x + self.mixer(rms_norm(x), cache=cache, **extra)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.padded_vocab_size, config.n_embd)
            for _ in range(config.value_embeds)
        )
        if config.smear:
            if config.n_embd < GATE_DIMS:
                raise MuonGPTError(f"model.smear needs n_embd >= {GATE_DIMS}, got {config.n_embd}")
            self.smear_gate = nn.Linear(GATE_DIMS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))  # starts as no smear at all
        else:
            self.smear_gate = self.smear_lambda = None
        if config.bigram_embed:
            self.bigram_embed = nn.Embedding(config.bigram_embed, config.n_embd)
            self.bigram_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        else:
            self.bigram_embed = self.bigram_lambdas = None
        self.backout_lambda = nn.Parameter(torch.tensor(0.5)) if config.backout_after else None
        n_skips = config.n_layer // 2 if config.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(n_skips)) if n_skips else None
        if config.fp8_head:
            from muongpt.model.fp8 import make_head

            self.lm_head = make_head(
                config.n_embd, config.padded_vocab_size, tuple(config.fp8_scales), config.fp8_dw
            )
        else:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # current flex window in tokens (a tensor so that a window schedule does not recompile)
        window = torch.tensor(config.attn_window or UNBOUNDED_WINDOW, dtype=torch.int32)
        self.register_buffer("current_window", window, persistent=False)
        # loss weights of the targets t+1, t+2, ... (a buffer: a weight schedule does not recompile)
        weights = torch.tensor([1.0, *config.mtp_weights], dtype=torch.float32)
        self.register_buffer("target_weights", weights, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith(("embed", "value_embeds")):
                nn.init.normal_(p, std=1.0)  # followed by RMSNorm, so the scale is free
            elif p.ndim == 2:
                # Uniform with std 0.5/sqrt(fan_in): keeps activations O(1) through the residual stream.
                bound = math.sqrt(3) * 0.5 / math.sqrt(p.size(1))
                nn.init.uniform_(p, -bound, bound)
        zero_init = [self.lm_head] + [b.mlp.proj for b in self.blocks]
        zero_init += [b.mixer.proj for b in self.blocks if b.kind == "attention"]
        zero_init += [
            b.mixer.gate for b in self.blocks if getattr(b.mixer, "gate", None) is not None
        ]
        zero_init += [self.smear_gate] if self.smear_gate is not None else []
        zero_init += [self.bigram_embed] if self.bigram_embed is not None else []
        for module in zero_init:
            nn.init.zeros_(module.weight)
        # PoM initialises itself (its output projection starts at zero too).
        for b in self.blocks:
            if b.kind == "pom" and hasattr(b.mixer, "reset_parameters"):
                b.mixer.reset_parameters()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # every embedding table: lookups, not matmuls
            n -= self.embed.weight.numel() + sum(e.weight.numel() for e in self.value_embeds)
            n -= self.bigram_embed.weight.numel() if self.bigram_embed is not None else 0
        return n

    def new_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        """Per-layer decoding state: a KV cache for attention, a constant-size state for PoM."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        caches = DecodeState()
        for b in self.blocks:
            if b.kind == "attention":
                caches.append(b.mixer.new_cache(batch_size, max_len, device, dtype))
            elif b.kind == "none":
                caches.append(None)
            else:
                caches.append(b.mixer.new_cache(batch_size, device))
        return caches

    def set_attn_window(self, tokens: int) -> None:
        """Sliding attention window from now on (flex; 0 = unbounded). No recompilation: the
        window is a buffer read by the compiled mask (training ramps it, see the trainer)."""
        if tokens < 0:
            raise MuonGPTError(f"attention window must be >= 0, got {tokens}")
        self.current_window.fill_(tokens or UNBOUNDED_WINDOW)

    def set_mtp_weights(self, weights) -> None:
        """Loss weights of the extra targets t+2, t+3, ... from now on (as many as configured)."""
        if len(weights) != len(self.config.mtp_weights):
            raise MuonGPTError(
                f"expected {len(self.config.mtp_weights)} multi-token weights, got {len(weights)}"
            )
        for k, w in enumerate(weights, start=1):  # fills from Python floats: no copy, no sync
            self.target_weights[k].fill_(w)

    def multi_targets(self, targets: Tensor) -> Tensor:
        """(B, T) next-token targets -> (B, T, K): column k holds the target of t+1+k, -1 (ignored)
        past the row's end or, with doc_mask, past the end of the token's document."""
        columns, crossed = [targets], torch.zeros_like(targets, dtype=torch.bool)
        for k in range(1, len(self.target_weights)):
            if self.config.doc_mask:  # an end-of-text among the targets before t+1+k
                crossed = crossed | F.pad(targets[:, k - 1 :] == self.config.bos_token, (0, k - 1))
            shifted = F.pad(targets[:, k:], (0, k), value=-1)
            columns.append(shifted.masked_fill(crossed, -1))
        return torch.stack(columns, dim=-1)

    def block_mask(self, idx: Tensor, window_fraction: float = 1.0):
        """Attention mask of a (B, T) batch: causal, document and window limits. A FlexAttention
        BlockMask on GPU; on CPU (no flex backward there) the same mask as a dense bool tensor."""
        window = self.current_window
        if window_fraction != 1.0:  # a short-window layer: a fraction of the current window
            window = (window * window_fraction).to(torch.int32).clamp(min=1)
        if self.config.doc_mask:  # documents start at the end-of-text token
            docs = (idx == self.config.bos_token).cumsum(-1, dtype=torch.int32)
        else:
            docs = torch.zeros_like(idx, dtype=torch.int32)
        if idx.device.type == "cpu":
            return document_dense_mask(docs, window)
        return document_block_mask(docs, window)

    def smear(self, x: Tensor, idx: Tensor, caches: DecodeState | None) -> Tensor:
        """Token smear: x_t <- x_t + lambda * sigmoid(w . x_t[:12]) * x_{t-1}, a cheap bigram
        path. A document's first token (with doc_mask) takes nothing from the one before it;
        when decoding, x_{t-1} of a chunk's first token comes from the decode state."""
        prev = x[:, :-1]
        if caches is not None:
            if caches.last_embedding is not None:
                prev = torch.cat([caches.last_embedding, prev], dim=1)
            caches.last_embedding = x[:, -1:]
        first = x.size(1) - prev.size(1)  # 1 if the first token has no predecessor here, else 0
        cur = x[:, first:]
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(cur[..., :GATE_DIMS]))
        if self.config.doc_mask:
            gate = gate * (idx[:, first:, None] != self.config.bos_token)
        smeared = cur + gate.to(x.dtype) * prev
        return torch.cat([x[:, :first], smeared], dim=1)

    def softcap(self, logits: Tensor) -> Tensor:
        """A tanh(logits / B) or A sigmoid((logits + C) / B), as in the fused fp8 loss."""
        mode = self.config.logit_softcap
        _, a, b, c = fp8_loss.cap_params(mode, self.config.softcap_value, self.config.sigmoid_cap)
        if mode == "tanh":
            return a * torch.tanh(logits / b)
        if mode == "sigmoid":
            return a * torch.sigmoid((logits + c) / b)
        return logits

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, caches: DecodeState | None = None
    ):
        """Mean cross-entropy over ``targets`` (ids < 0 are ignored), or fp32 logits (B, T, vocab)."""
        x = self.embed(idx)
        if self.config.residual_bf16 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.config.embed_norm:
            x = rms_norm(x)
        if self.smear_gate is not None:
            x = self.smear(x, idx, caches)
        x0 = x
        ves = [e(idx) for e in self.value_embeds]
        bigram = self.bigrams(idx, caches, x.dtype) if self.bigram_embed is not None else None
        masks, window = {}, 0
        if self.config.attention == "flex":
            if caches is None:  # one mask per distinct window length
                masks = {f: self.block_mask(idx, f) for f in set(self.config.window_pattern)}
            else:  # decoding: the KV-cache path applies the same window (not the document mask)
                window = int(self.current_window)
                window = 0 if window >= UNBOUNDED_WINDOW else window
        n_enc = len(self.skip_weights) if self.skip_weights is not None else 0
        skips = []
        early = None
        for i, block in enumerate(self.blocks):
            if self.backout_lambda is not None and i == self.config.backout_after:
                early = x
            if n_enc and i >= self.config.n_layer - n_enc:  # U-net: decoder half takes the skips
                x = x + self.skip_weights[i - (self.config.n_layer - n_enc)] * skips.pop()
            if bigram is not None:
                x = x + self.bigram_lambdas[i] * bigram
            v = self.config.value_embed_of_layer(i)
            x = block(
                x,
                cache=None if caches is None else caches[i],
                x0=x0,
                ve=None if v is None else ves[v],
                mask=masks.get(self.config.window_of_layer(i)),
                window=window and self.config.layer_window(i, window),
            )
            if i < n_enc:
                skips.append(x)
        if early is not None:
            x = x - self.backout_lambda * early
        if targets is not None and self.training and self.config.mtp_weights:
            targets = self.multi_targets(targets)
        return self.head(x, targets)

    def bigrams(self, idx: Tensor, caches: DecodeState | None, dtype: torch.dtype) -> Tensor:
        """The bigram table's rows for ``idx``; decoding continues from the last token seen."""
        prev = None
        if caches is not None:
            prev = caches.last_token
            caches.last_token = idx[:, -1:]
        doc_start = self.config.bos_token if self.config.doc_mask else None
        rows = bigram_rows(idx, self.config.bigram_embed, prev, doc_start)
        return self.bigram_embed(rows).to(dtype)

    def fused_loss_ok(self, x: Tensor) -> bool:
        """The fused fp8 head + loss runs while training (gradients on) on an fp8 GPU."""
        return (
            self.config.fp8_fused_loss
            and torch.is_grad_enabled()
            and fp8_loss.triton is not None
            and self.lm_head.fp8_usable(x)
        )

    def head(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """Final norm, lm_head, soft-cap (fp32), then the loss or the logits. A method of its own
        so that it can be compiled alone (``training.compile_mode=blocks``)."""
        x = rms_norm(x)
        multi = targets is not None and targets.ndim == x.ndim  # (B, T, K): multi-token
        if targets is not None and self.fused_loss_ok(x):
            return fp8_loss.fp8_cross_entropy(
                x,
                self.lm_head.weight,
                targets,
                self.lm_head.scales,
                self.config.logit_softcap,
                self.config.softcap_value,
                self.config.sigmoid_cap,
                self.target_weights if multi else None,
            )
        logits = self.softcap(self.lm_head(x).float())
        if targets is None:
            return logits[..., : self.config.vocab_size]
        logits = logits.view(-1, logits.size(-1))
        if multi:
            return multi_token_loss(logits, targets.view(logits.size(0), -1), self.target_weights)
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)
