"""The core GPT: one readable file, the math visible.

    x = embed(idx)
    for each block:   x = x + mixer(norm(x))      # causal self-attention (doc_mask: within each
                                                  # packed document) or PoM
                      x = x + mlp(norm(x))        # relu(x W1)^2 W2, 4x wide
    logits = cap(lm_head(norm(x)))                # fp32; cap(l) = c tanh(l / c), or l when c = 0

RMSNorm has no learned scale, there are no biases, output projections start at zero (each block
begins as the identity), and the lm_head is not tied to the embedding. The vocabulary is padded to
a multiple of 128 (a fast head matmul); padded rows are never returned and never targets.

The speed-run variant (``model/speedrun.py``) is built from these parts. Kernels (FP8 head, fused
head + loss, fused ReLU^2 MLP, FlexAttention) are swapped in from outside the model by
``muongpt.kernels.converters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError
from muongpt.model.attention import CausalSelfAttention, rms_norm
from muongpt.model.masks import document_dense_mask
from muongpt.model.pom import PoM


@dataclass
class MixingConfig:
    """The token mixer of each layer, cycled over the depth, and PoM's shape."""

    pattern: list[str] = field(default_factory=lambda: ["attention"])  # attention | pom
    pom_degree: int = 2
    # 1, not 2: at d12 (bench pack, 100 steps) 0.017-0.035 nats worse at equal tokens, 17-24% less
    # training time, half the state (docs/pom.md)
    pom_expand: int = 1
    # 4, not 1: a 4x smaller gate matmul, the layer about 7 ns/token faster; at d12 (bench pack,
    # 100 steps, seed 1337) 0.001 (PoM) and 0.019 (hybrid) nats worse at equal tokens (docs/pom.md)
    pom_n_sel_heads: int = 4
    # width of PoM's causal depthwise convolution, its position signal (0 = none): d12 on the
    # bench pack, 100 steps, val 5.175 with it against 5.542 without (docs/pom.md)
    pom_conv: int = 4


@dataclass
class GPTConfig:
    name: str = "gpt"  # which model this config builds (muongpt.model.MODELS)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    logit_softcap: float = 0.0  # c of c * tanh(logits / c); 0 = no cap
    # attention within each packed document only (model=speedrun always masks documents); PoM's
    # running mean spans the whole row
    doc_mask: bool = False
    bos_token: int = 50256  # documents start at this token
    mixing: MixingConfig = field(default_factory=MixingConfig)

    mixers = ("attention", "pom")  # the pattern entries this model builds

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise MuonGPTError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise MuonGPTError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.logit_softcap < 0:
            raise MuonGPTError(f"model.logit_softcap must be >= 0, got {self.logit_softcap}")
        pattern = self.mixing.pattern
        if not pattern or any(m not in self.mixers for m in pattern):
            raise MuonGPTError(
                f"model.mixing.pattern entries must be in {self.mixers} for model={self.name}, "
                f"got {list(pattern)}"
            )

    @property
    def masks_documents(self) -> bool:
        """Whether attention takes whole-sequence document masks (``model.doc_mask``)."""
        return self.doc_mask

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 128) * 128

    def mixer_of_layer(self, i: int) -> str:
        return self.mixing.pattern[i % len(self.mixing.pattern)]


class SoftCap(nn.Module):
    """Logit soft-cap in fp32: ``a tanh((l + c) / b)``, ``a sigmoid((l + c) / b)`` or ``l``.

    Bounded logits keep the softmax from saturating early in training (Gemma 2; modded-nanogpt
    uses the sigmoid form, whose output is also bounded below). The fused FP8 loss kernel
    computes the same function from ``kernel_form``."""

    KINDS = ("none", "tanh", "sigmoid")

    def __init__(self, kind: str = "none", a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__()
        if kind not in self.KINDS:
            raise MuonGPTError(f"soft-cap must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.a, self.b, self.c = kind, float(a), float(b), float(c)

    @classmethod
    def tanh(cls, cap: float) -> SoftCap:
        """``cap * tanh(l / cap)``; no cap for ``cap`` = 0."""
        return cls("tanh", cap, cap) if cap > 0 else cls()

    def kernel_form(self) -> tuple[str, float, float, float]:
        return self.kind, self.a, self.b, self.c

    def forward(self, logits: Tensor) -> Tensor:
        if self.kind == "tanh":
            return self.a * torch.tanh((logits + self.c) / self.b)
        if self.kind == "sigmoid":
            return self.a * torch.sigmoid((logits + self.c) / self.b)
        return logits

    def extra_repr(self) -> str:
        return f"{self.kind}, a={self.a}, b={self.b}, c={self.c}"


class Head(nn.Linear):
    """Final RMSNorm, projection to the padded vocabulary, soft-cap in fp32; then the mean
    cross-entropy over ``targets`` (ids < 0 ignored), or the logits of the real vocabulary."""

    def __init__(self, dim: int, padded_vocab: int, vocab_size: int, cap: SoftCap):
        super().__init__(dim, padded_vocab, bias=False)
        self.vocab_size = vocab_size
        self.cap = cap

    def project(self, x: Tensor) -> Tensor:
        """x W^T: the matmul the FP8 converters replace."""
        return F.linear(x, self.weight)

    def forward(
        self, x: Tensor, targets: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """``targets`` (...) or, with ``weights`` (K,), (..., K): K targets per position, the
        loss sum_k w_k CE(logits, target_k) over the positions whose first target is valid."""
        logits = self.cap(self.project(rms_norm(x)).float())
        if targets is None:
            return logits[..., : self.vocab_size]
        logits = logits.view(-1, logits.size(-1))
        if weights is None:
            return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)
        targets = targets.reshape(logits.size(0), -1)
        valid = targets >= 0
        picked = logits.gather(1, targets.clamp(min=0))
        terms = (logits.logsumexp(-1, keepdim=True) - picked) * weights.float() * valid
        return terms.sum() / valid[:, 0].sum().clamp(min=1)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim, bias=False)
        self.proj = nn.Linear(ratio * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())  # ReLU^2 (So et al. 2021)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, mlp: MLP):
        super().__init__()
        self.mixer, self.mlp = mixer, mlp

    def forward(self, x: Tensor, cache=None, mask=None) -> Tensor:
        """``mask``: the attention mixer's whole-sequence mask (None: causal)."""
        h = rms_norm(x)
        x = x + (self.mixer(h, cache=cache) if mask is None else self.mixer(h, mask=mask))
        return x + self.mlp(rms_norm(x))


def documents(idx: Tensor, bos_token: int) -> Tensor:
    """Each token's document number in its row (B, T), int32: a running count of ``bos_token``."""
    return (idx == bos_token).cumsum(-1, dtype=torch.int32)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(config.n_layer))
        self.add_parts()
        if config.masks_documents:  # how masks are built: dense for SDPA; flex_attention swaps it
            self.mask_builder = document_dense_mask
        self.lm_head = Head(
            config.n_embd, config.padded_vocab_size, config.vocab_size, self.make_cap()
        )
        self.reset_parameters()

    # ---------------------------------------------------------------- construction
    def make_mixer(self, layer: int) -> nn.Module | None:
        c = self.config
        if c.mixer_of_layer(layer) == "attention":
            return CausalSelfAttention(c.n_embd, c.n_head, c.rope_base)
        m = c.mixing
        return PoM(c.n_embd, m.pom_degree, m.pom_expand, m.pom_n_sel_heads, conv=m.pom_conv)

    def make_block(self, layer: int) -> nn.Module:
        return Block(self.make_mixer(layer), MLP(self.config.n_embd, self.config.mlp_ratio))

    def add_parts(self) -> None:
        """Modules registered between the blocks and the head (a variant's extra parts)."""

    def tied_weights(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(copy, master): two weights trained as one while the run keeps them tied: the
        optimizer steps the master on the sum of both gradients and the copy takes its values
        (a variant's option; the core GPT ties none)."""
        return None

    def untie_weights(self) -> Tensor | None:
        """Called once, before the first step in which the tied weights train apart; returns
        the factor each row of the copy was scaled by there, (rows, 1), or None for none."""
        return None

    def make_cap(self) -> SoftCap:
        return SoftCap.tanh(self.config.logit_softcap)

    def lookup_tables(self) -> list[nn.Parameter]:
        """Embedding tables: read by index, trained by AdamW at the embedding lr."""
        return [self.embed.weight]

    def zero_init(self) -> list[nn.Parameter]:
        """Weights that start at zero, so that each block and the head start silent."""
        zeros = [self.lm_head.weight]
        for b in self.blocks:
            zeros.append(b.mlp.proj.weight)
            if isinstance(b.mixer, CausalSelfAttention):
                zeros.append(b.mixer.proj.weight)
        return zeros

    @torch.no_grad()
    def reset_parameters(self) -> None:
        tables = {id(p) for p in self.lookup_tables()}
        for p in self.parameters():
            if id(p) in tables:
                nn.init.normal_(p, std=1.0)  # followed by RMSNorm, so the scale is free
            elif p.ndim == 2:
                # Uniform with std 0.5/sqrt(fan_in): keeps activations O(1) through the residual stream.
                bound = math.sqrt(3) * 0.5 / math.sqrt(p.size(1))
                nn.init.uniform_(p, -bound, bound)
        for p in self.zero_init():
            nn.init.zeros_(p)
        for b in self.blocks:  # PoM initialises itself (its output projection starts at zero too)
            if isinstance(b.mixer, PoM):
                b.mixer.reset_parameters()
        tied = self.tied_weights()
        if tied is not None:
            tied[0].copy_(tied[1])

    # ---------------------------------------------------------------- optimizer groups
    def optimizer_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each trainable parameter's optimizer group, in ``named_parameters`` order:

        - ``matrix``: the blocks' hidden matrices (Muon or SOAP orthogonalize / precondition them)
        - ``embed``: lookup tables (``lookup_tables``)
        - ``head``: the lm_head
        - ``scalar``: every parameter with fewer than 2 dims (gains, mixing weights, lambdas)

        A matrix outside the blocks that is none of these is an error, not a silent choice."""
        tables = {id(p) for p in self.lookup_tables()}
        hidden = {id(p) for p in self.blocks.parameters() if p.ndim >= 2}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "matrix": [],
            "embed": [],
            "head": [],
            "scalar": [],
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in tables:
                groups["embed"].append((name, p))
            elif p is self.lm_head.weight:
                groups["head"].append((name, p))
            elif id(p) in hidden:
                groups["matrix"].append((name, p))
            elif p.ndim < 2:
                groups["scalar"].append((name, p))
            else:
                raise MuonGPTError(f"parameter {name} {tuple(p.shape)} has no optimizer group")
        return groups

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # embedding tables are lookups, not matmuls
            n -= sum(p.numel() for p in self.lookup_tables())
        return n

    # ---------------------------------------------------------------- forward
    def new_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """Per-layer decoding state: a KV cache for attention, a constant-size state for PoM."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        caches = []
        for b in self.blocks:
            if isinstance(b.mixer, CausalSelfAttention):
                caches.append(b.mixer.new_cache(batch_size, max_len, device, dtype))
            elif isinstance(b.mixer, PoM):
                caches.append(b.mixer.new_cache(batch_size, device))
            else:
                caches.append(None)
        return caches

    def forward(self, idx: Tensor, targets: Tensor | None = None, caches: list | None = None):
        """Mean cross-entropy over ``targets`` (ids < 0 are ignored), or fp32 logits (B, T, vocab)."""
        x = self.embed(idx)
        mask = None
        if self.config.doc_mask and caches is None:  # decoding: the prompt is one document
            mask = self.mask_builder(documents(idx, self.config.bos_token))
        for i, block in enumerate(self.blocks):
            attends = isinstance(block.mixer, CausalSelfAttention)
            x = block(
                x, cache=None if caches is None else caches[i], mask=mask if attends else None
            )
        return self.lm_head(x, targets)
