"""Autoregressive sampling with per-layer caches (KV for attention, running state for PoM)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from muongpt import MuonGPTError
from muongpt.model.gpt import GPT


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; mask the rest."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens entirely past the nucleus
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time. temperature 0 means greedy decoding."""
    if not prompt:
        raise MuonGPTError("empty prompt: give at least one token (e.g. the end-of-text token)")
    if temperature < 0:
        raise MuonGPTError(f"temperature must be >= 0, got {temperature}")
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    caches = model.new_caches(1, len(prompt) + max_new_tokens) if use_cache else None
    inputs = tokens
    for _ in range(max_new_tokens):
        logits = model(inputs, caches=caches)[:, -1, :]
        if temperature == 0:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        inputs = next_token if use_cache else tokens
        yield int(next_token)
