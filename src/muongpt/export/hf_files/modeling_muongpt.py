"""A muongpt GPT (``model=gpt``) as a Hugging Face causal language model.

Written by ``muongpt export hf``; needs only torch and transformers. The math is muongpt's lean
GPT, term for term, so the logits equal muongpt's:

    x = embed(idx)                                   # table of padded_vocab_size rows
    for each block:   x = x + attn(norm(x))
                      x = x + mlp(norm(x))           # proj(relu(fc(x))^2)
    logits = cap(lm_head(norm(x)))[..., :vocab_size] # fp32; cap(l) = c tanh(l / c), c = 0: none

    norm: RMSNorm without a learned scale; no biases anywhere; lm_head not tied to embed.
    attn: q, k = rope(norm(x Wq)), rope(norm(x Wk)) per head (QK-norm), v = x Wv,
          causal softmax(q k^T / sqrt(head_dim)) v, then Wo.
    rope: dims i and i + head_dim/2 rotate together at frequency base^(-2i / head_dim).

Parameter names are muongpt's own (``embed``, ``blocks.N.mixer.{q,k,v,proj}``,
``blocks.N.mlp.{fc,proj}``, ``lm_head``), so the weights file is the training state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_muongpt import MuonGPTConfig

# The output field that holds the KV cache: ``cache`` in newer transformers, else the older name.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dimension, without a learned scale (eps: the dtype's epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (B, T, H, head_dim): the first half pairs with the second half."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (B, T, 1, head_dim/2) in fp32, of integer positions (B, T)."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]


class Attention(nn.Module):
    def __init__(self, config: MuonGPTConfig, layer: int):
        super().__init__()
        dim = config.n_embd
        self.layer, self.n_head, self.head_dim = layer, config.n_head, dim // config.n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def heads(self, y: Tensor) -> Tensor:
        return y.view(*y.shape[:2], self.n_head, self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache) -> Tensor:
        B, T, D = x.shape
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q = rotate(rms_norm(self.heads(self.q(x))), cos, sin).transpose(1, 2)
        k = rotate(rms_norm(self.heads(self.k(x))), cos, sin).transpose(1, 2)
        v = self.heads(self.v(x)).transpose(1, 2)  # (B, H, T, head_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # the rotated keys of every position so far
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: MuonGPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: MuonGPTConfig, layer: int):
        super().__init__()
        self.mixer = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache) -> Tensor:
        x = x + self.mixer(rms_norm(x), cos, sin, mask, cache)
        return x + self.mlp(rms_norm(x))


class MuonGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MuonGPTConfig
    base_model_prefix = "muongpt"
    _supports_sdpa = True

    def __init__(self, config: MuonGPTConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only for a model built from a config alone: muongpt's initialisation (scaled uniform
        # matrices, unit-normal embedding, zero output projections) lives in muongpt itself.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.5 / module.in_features**0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _positions_and_mask(
        self, T: int, start: int, attention_mask: Tensor | None, position_ids: Tensor | None, x
    ) -> tuple[Tensor, Tensor | None]:
        """Positions (B, T) and the boolean attention mask (None: plain causal, no cache)."""
        B, device = x.size(0), x.device
        S = start + T  # keys: the cached ones and these
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:  # left padding: a row's first real token is its position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(start, S, device=device).expand(B, T)
        if not padded and start == 0:
            return position_ids, None
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(
            start
        )  # query i: keys <= start + i
        mask = causal[None, None]
        if padded:
            mask = mask & attention_mask[:, None, None, -S:].bool()
            # A padding query that sees no key would give NaN: let it see itself.
            mask = mask | (causal & causal.triu(start))[None, None]
        return position_ids, mask

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        past_key_values=None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        start = cache.get_seq_length() if cache is not None else 0
        positions, mask = self._positions_and_mask(T, start, attention_mask, position_ids, x)
        cos, sin = rope_tables(
            positions, self.config.n_embd // self.config.n_head, self.config.rope_base
        )
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        logits = F.linear(rms_norm(x), self.lm_head.weight).float()
        if self.config.logit_softcap > 0:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        logits = logits[..., : self.config.vocab_size]
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
