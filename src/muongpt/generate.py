"""Inference: load a trained model, sample from it with per-layer caches, stream the text.

Decoding keeps one cache per layer (``model.new_caches``): the keys and values of the tokens so
far for attention, the constant-size running state for PoM. The prompt goes through the model
once; each new token then costs one single-position forward pass.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from muongpt import MuonGPTError
from muongpt.model.gpt import GPT


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MuonGPTError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MuonGPTError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(
    path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None
) -> tuple[GPT, dict]:
    """Rebuild the GPT of a checkpoint in eval mode; returns (model, checkpoint dict).

    ``path`` is a training checkpoint (``step_NNNNNN.pt``) or its weights-only export
    (``model.safetensors``, whose metadata carries the config). ``overrides`` (``model.KEY=VALUE``)
    change the stored model config first, for options that keep the weights (e.g.
    ``model.eval_window_factor``); one that does not fit them is an error.
    """
    from omegaconf.errors import OmegaConfBaseException

    from muongpt.config import model_config, upgrade_config
    from muongpt.model import build_model
    from muongpt.train.checkpoint import (
        CheckpointError,
        check_weights_fit_config,
        load_checkpoint,
        read_export,
    )

    try:
        if str(path).endswith(".safetensors"):
            weights, meta = read_export(path)
            state = {"model": weights, **meta}
            if "config" not in state:
                raise CheckpointError(f"{path}: not a muongpt export (no config in its metadata)")
        else:
            state = load_checkpoint(path)
    except MuonGPTError:
        raise
    except Exception as e:  # garbage bytes can trip the unpickler in many ways
        raise CheckpointError(
            f"{path}: not a muongpt checkpoint (unreadable: {type(e).__name__})"
        ) from None
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: not a muongpt checkpoint (config or weights malformed)")
    try:
        stored = upgrade_config(state["config"])["model"]
        config = model_config(stored)
    except MuonGPTError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (OmegaConfBaseException, TypeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a muongpt checkpoint (bad model config: {first})"
        ) from None
    if overrides:
        try:
            config = model_config(with_overrides(stored, overrides))
        except (MuonGPTError, OmegaConfBaseException, TypeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MuonGPTError(f"overrides {' '.join(overrides)}: {first}") from None
    try:
        check_weights_fit_config(path, config, state["model"])  # before anything is allocated
    except CheckpointError as e:
        if not overrides:
            raise
        raise MuonGPTError(
            f"overrides {' '.join(overrides)} change the weights' shapes: {e}"
        ) from None
    model = build_model(config)
    # A state dict saved from a torch.compile'd module carries an "_orig_mod." prefix.
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval(), state


def with_overrides(model: dict, overrides: list[str] | None) -> dict:
    """The stored model config with ``model.KEY=VALUE`` overrides (YAML values) applied."""
    if not overrides:
        return model
    from omegaconf import OmegaConf

    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.startswith("model.") or key == "model.":
            raise MuonGPTError(f"override {item!r}: expected model.KEY=VALUE")
    dotlist = [item.removeprefix("model.") for item in overrides]
    merged = OmegaConf.merge(OmegaConf.create(model), OmegaConf.from_dotlist(dotlist))
    return OmegaConf.to_container(merged)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; mask the rest."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens entirely past the nucleus
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise MuonGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise MuonGPTError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise MuonGPTError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise MuonGPTError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


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
    """Yield new token ids one at a time. temperature 0 means greedy decoding.

    The same seed gives the same tokens; ``seed=None`` draws a fresh one. ``use_cache=False``
    re-reads the whole sequence at every step (the reference the cached path must equal).
    """
    if not prompt:
        raise MuonGPTError("empty prompt: give at least one token (e.g. the end-of-text token)")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise MuonGPTError(f"prompt token ids must lie in [0, {vocab})")
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
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


class TextStreamer:
    """Turns token ids into text as they come, holding back a UTF-8 character split across tokens.

    GPT-2 tokens are byte sequences: one emoji may span two tokens, and neither half is text on
    its own. ``push`` returns only complete characters; ``finish`` flushes the rest (an
    incomplete tail becomes U+FFFD).
    """

    def __init__(self):
        from muongpt.data.tokenizer import get_tokenizer

        self.token_bytes = get_tokenizer().decode_single_token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.token_bytes(token))

    def finish(self) -> str:
        return self.decoder.decode(b"", final=True)
