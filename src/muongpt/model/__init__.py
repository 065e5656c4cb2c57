"""Models, chosen by name (``model=gpt`` or ``model=speedrun``): each name maps to its config
schema and its module."""

from muongpt import MuonGPTError
from muongpt.model.attention import CausalSelfAttention, KVCache
from muongpt.model.gpt import GPT, GPTConfig, MixingConfig
from muongpt.model.pom import PoM, PoMCache
from muongpt.model.speedrun import SpeedrunConfig, SpeedrunGPT

MODELS: dict[str, tuple[type[GPTConfig], type[GPT]]] = {
    "gpt": (GPTConfig, GPT),
    "speedrun": (SpeedrunConfig, SpeedrunGPT),
}


def build_model(config: GPTConfig) -> GPT:
    """The model a config describes (its ``name`` picks the class)."""
    if config.name not in MODELS:
        raise MuonGPTError(f"model.name must be one of {sorted(MODELS)}, got {config.name!r}")
    schema, model = MODELS[config.name]
    if not isinstance(config, schema):
        raise MuonGPTError(
            f"model={config.name} needs a {schema.__name__}, got {type(config).__name__}"
        )
    return model(config)


__all__ = [
    "GPT",
    "MODELS",
    "CausalSelfAttention",
    "GPTConfig",
    "KVCache",
    "MixingConfig",
    "PoM",
    "PoMCache",
    "SpeedrunConfig",
    "SpeedrunGPT",
    "build_model",
]
