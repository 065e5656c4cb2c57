"""Pure nn.Module code: the GPT, its token mixers (attention, PoM) and the FP8 head."""

from muongpt.model.attention import CausalSelfAttention, KVCache
from muongpt.model.gpt import GPT, GPTConfig
from muongpt.model.pom import PoM, PoMCache

__all__ = ["GPT", "GPTConfig", "CausalSelfAttention", "KVCache", "PoM", "PoMCache"]
