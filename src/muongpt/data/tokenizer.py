"""The GPT-2 byte-pair encoding, built offline from the vocabulary shipped in the package."""

from __future__ import annotations

from functools import lru_cache

import tiktoken
import tiktoken.load

from muongpt.assets import GPT2_TIKTOKEN

EOT_TOKEN = 50256  # <|endoftext|>: separates (and starts) every document
GPT2_VOCAB_SIZE = 50257

# GPT-2's pre-tokenization pattern (contractions, letters, digits, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """Return the GPT-2 encoder; identical to ``tiktoken.get_encoding("gpt2")``, with no download."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(GPT2_TIKTOKEN)),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def encode(text: str) -> list[int]:
    """Encode ordinary text (special-token strings in the text are treated as plain text)."""
    return get_tokenizer().encode_ordinary(text)


def decode(tokens) -> str:
    return get_tokenizer().decode([int(t) for t in tokens])
