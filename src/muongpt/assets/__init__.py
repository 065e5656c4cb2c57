"""Files shipped inside the package so that nothing needs the network after install."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
GPT2_TIKTOKEN = ASSETS_DIR / "gpt2.tiktoken"
GPT2_MERGES = ASSETS_DIR / "gpt2_vocab.bpe"  # the merges of the same vocabulary (HF format)
TINY_SHAKESPEARE = ASSETS_DIR / "tinyshakespeare.txt"
