"""The GPT model: one readable file, the math visible.

    x = embed(idx)
    for each block:   x = x + mixer(norm(x))      # causal self-attention or PoM
                      x = x + mlp(norm(x))        # relu(x W1)^2 W2, 4x wide
    logits = softcap(lm_head(norm(x)))            # fp32, vocabulary padded to a multiple of 128

RMSNorm has no learned scale, there are no biases, output projections start at zero (each block
begins as the identity), and the lm_head is not tied to the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muongpt import MuonGPTError
from muongpt.model.attention import CausalSelfAttention, rms_norm

SOFTCAPS = ("none", "tanh", "sigmoid")
MIXERS = ("attention", "pom")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    # "none", "tanh": c * tanh(x / c), or "sigmoid": 30 * sigmoid(x / 7.5) (modded-nanogpt, 2025)
    logit_softcap: str = "none"
    softcap_value: float = 15.0
    # Token mixer of each layer, cycled over the depth: ["attention"], ["pom"], ["pom", "attention"], ...
    mixer_pattern: list[str] = field(default_factory=lambda: ["attention"])
    pom_degree: int = 2
    pom_expand: int = 2
    pom_n_sel_heads: int = 1
    fp8_head: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise MuonGPTError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise MuonGPTError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.logit_softcap not in SOFTCAPS:
            raise MuonGPTError(f"logit_softcap must be one of {SOFTCAPS}, got {self.logit_softcap!r}")
        if not self.mixer_pattern or any(m not in MIXERS for m in self.mixer_pattern):
            raise MuonGPTError(f"mixer_pattern entries must be in {MIXERS}, got {self.mixer_pattern}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 128) * 128  # multiples of 128 keep the head matmul fast

    def mixer_of_layer(self, i: int) -> str:
        return self.mixer_pattern[i % len(self.mixer_pattern)]


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim, bias=False)
        self.proj = nn.Linear(ratio * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())  # ReLU^2 (So et al. 2021)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.kind = config.mixer_of_layer(layer)
        if self.kind == "attention":
            self.mixer = CausalSelfAttention(config.n_embd, config.n_head, config.rope_base)
        else:
            from muongpt.model.pom import PoM

            self.mixer = PoM(
                config.n_embd, config.pom_degree, config.pom_expand, config.pom_n_sel_heads
            )
        self.mlp = MLP(config.n_embd, config.mlp_ratio)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        x = x + self.mixer(rms_norm(x), cache=cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        if config.fp8_head:
            from muongpt.model.fp8 import make_head

            self.lm_head = make_head(config.n_embd, config.padded_vocab_size)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith("embed"):
                nn.init.normal_(p, std=1.0)  # followed by RMSNorm, so the scale is free
            elif p.ndim == 2:
                # Uniform with std 0.5/sqrt(fan_in): keeps activations O(1) through the residual stream.
                bound = math.sqrt(3) * 0.5 / math.sqrt(p.size(1))
                nn.init.uniform_(p, -bound, bound)
        zero_init = [self.lm_head] + [b.mlp.proj for b in self.blocks]
        zero_init += [b.mixer.proj for b in self.blocks if b.kind == "attention"]
        for module in zero_init:
            nn.init.zeros_(module.weight)
        # PoM initialises itself (its output projection starts at zero too).
        for b in self.blocks:
            if b.kind == "pom" and hasattr(b.mixer, "reset_parameters"):
                b.mixer.reset_parameters()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def new_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """Per-layer decoding state: a KV cache for attention, a constant-size state for PoM."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        caches = []
        for b in self.blocks:
            if b.kind == "attention":
                caches.append(b.mixer.new_cache(batch_size, max_len, device, dtype))
            else:
                caches.append(b.mixer.new_cache(batch_size, device))
        return caches

    def softcap(self, logits: Tensor) -> Tensor:
        mode = self.config.logit_softcap
        if mode == "tanh":
            c = self.config.softcap_value
            return c * torch.tanh(logits / c)
        if mode == "sigmoid":
            return 30 * torch.sigmoid(logits / 7.5)
        return logits

    def forward(self, idx: Tensor, targets: Tensor | None = None, caches: list | None = None):
        """Mean cross-entropy over ``targets`` (ids < 0 are ignored), or fp32 logits (B, T, vocab)."""
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        logits = self.softcap(self.lm_head(rms_norm(x)).float())
        if targets is None:
            return logits[..., : self.config.vocab_size]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
