"""Configuration of a muongpt GPT (``model=gpt``) exported for Hugging Face transformers.

Written by ``muongpt export hf``; needs only torch and transformers. The fields are muongpt's
``model`` section; ``padded_vocab_size`` is the width of the embedding and head tables (the
vocabulary rounded up to a multiple of 128).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MuonGPTConfig(PretrainedConfig):
    model_type = "muongpt"
    # The names other transformers code (caches, generation) looks for.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        padded_vocab_size: int = 50304,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        mlp_ratio: int = 4,
        rope_base: float = 10000.0,
        logit_softcap: float = 0.0,
        max_position_embeddings: int = 1024,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.mlp_ratio = mlp_ratio
        self.rope_base = rope_base
        self.logit_softcap = logit_softcap
        self.max_position_embeddings = max_position_embeddings  # the training context (RoPE)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
