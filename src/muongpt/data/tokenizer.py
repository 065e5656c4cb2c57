"""The GPT-2 byte-pair encoding, built offline from the vocabulary shipped in the package."""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken

from muongpt.assets import GPT2_TIKTOKEN

EOT_TOKEN = 50256  # <|endoftext|>: separates (and starts) every document
GPT2_VOCAB_SIZE = 50257

# GPT-2's pre-tokenization pattern (contractions, letters, digits, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file (lines of ``base64(token) rank``) straight from ``path``.

    tiktoken.load.load_tiktoken_bpe would also copy it into a cache in the temp folder, keyed by
    path and trusted without a hash, so a stale copy there could shadow the shipped file.
    """
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoder: identical to ``tiktoken.get_encoding("gpt2")``, with no download."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=_load_ranks(GPT2_TIKTOKEN),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def encode(text: str) -> list[int]:
    """Encode ordinary text (special-token strings in the text are treated as plain text)."""
    return get_tokenizer().encode_ordinary(text)


def decode(tokens) -> str:
    return get_tokenizer().decode([int(t) for t in tokens])


@lru_cache(maxsize=1)
def prefix_tokens() -> np.ndarray:
    """For every GPT-2 token id, the id of the token whose bytes are the longest proper prefix
    of its bytes (" hello" -> " hell"), or -1 where none is a token (one-byte tokens, and
    <|endoftext|>). int64, GPT2_VOCAB_SIZE entries."""
    ranks = _load_ranks(GPT2_TIKTOKEN)
    out = np.full(GPT2_VOCAB_SIZE, -1, dtype=np.int64)
    for token, rank in ranks.items():
        for k in range(len(token) - 1, 0, -1):
            prefix = ranks.get(token[:k])
            if prefix is not None:
                out[rank] = prefix
                break
    return out
