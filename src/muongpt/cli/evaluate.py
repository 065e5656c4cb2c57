"""`muongpt eval CHECKPOINT --data FILES...`: validation loss and bits per byte of a checkpoint.

Each file is one token stream: a ``.bin`` shard as it is, a text file as [end-of-text] + its GPT-2
tokens (every training document starts with that token). The stream is cut into consecutive
windows of ``seq_len`` predicted tokens (each token is predicted once; the context restarts at
each window), and the last, shorter window is evaluated too.

    loss          = total nats / predicted tokens                    (comparable to val_loss)
    bits per byte = text nats / (ln 2 · UTF-8 bytes of the predicted text)

Bits per byte does not depend on the tokenizer. The end-of-text token is a document separator,
not text: it has no bytes, and its nats are left out of bits per byte (they stay in the loss).
For a text file the bytes are exactly the file's UTF-8 length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.cli import probe_file, report_errors, write_text


@dataclass
class EvalResult:
    name: str
    tokens: int = 0  # predicted tokens
    nats: float = 0.0  # their total cross-entropy
    text_tokens: int = 0  # predicted tokens other than end-of-text
    text_nats: float = 0.0
    bytes: int = 0  # UTF-8 bytes of the predicted text tokens

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.text_nats / (math.log(2) * self.bytes) if self.bytes else math.nan

    def add(self, other: EvalResult) -> None:
        for name in ("tokens", "nats", "text_tokens", "text_nats", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        finite = lambda x: x if math.isfinite(x) else None  # JSON has no NaN
        return {
            **asdict(self),
            "loss": finite(self.loss),
            "bits_per_byte": finite(self.bits_per_byte),
        }


@lru_cache(maxsize=4)
def token_byte_lengths(vocab_size: int) -> np.ndarray:
    """UTF-8 length of every token id (the end-of-text token: 0 bytes)."""
    from muongpt.data.tokenizer import EOT_TOKEN, get_tokenizer

    enc = get_tokenizer()
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for t in range(min(vocab_size, enc.n_vocab)):
        if t != EOT_TOKEN:
            lengths[t] = len(enc.decode_single_token_bytes(t))
    return lengths


def load_tokens(path: Path) -> np.ndarray:
    """A shard's tokens (memory-mapped), or [end-of-text] + the tokens of a UTF-8 text file."""
    from muongpt.data.shards import open_shard
    from muongpt.data.tokenizer import EOT_TOKEN, encode

    if not path.is_file():
        raise MuonGPTError(f"--data: file not found: {path}")
    if path.suffix == ".bin":
        return open_shard(path)
    if path.suffix in (".xz", ".gz", ".zst", ".bz2"):
        raise MuonGPTError(f"--data {path}: compressed; unpack it first (e.g. `xz -dk {path}`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MuonGPTError(
            f"--data {path}: not UTF-8 text (byte {e.start}); use .bin for token shards"
        ) from None
    return np.array([EOT_TOKEN] + encode(text), dtype=np.int64)


def windows(n_tokens: int, seq_len: int, max_targets: int | None) -> list[tuple[int, int]]:
    """(start, length) of consecutive windows covering targets 1 .. n_tokens-1 (capped)."""
    n_targets = max(n_tokens - 1, 0)
    if max_targets is not None:
        n_targets = min(n_targets, max_targets)
    return [(s, min(seq_len, n_targets - s)) for s in range(0, n_targets, seq_len)]


@torch.no_grad()
def evaluate_tokens(
    model,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    name: str = "",
    max_targets: int | None = None,
    autocast: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Sum the model's per-token cross-entropy over one token stream (see the module docstring).

    ``progress``: a progress bar on stderr, one tick per batch of windows."""
    from tqdm import tqdm

    from muongpt.data.tokenizer import EOT_TOKEN

    vocab = model.config.vocab_size
    byte_lengths = token_byte_lengths(vocab)
    device = model.embed.weight.device
    result = EvalResult(name)
    spans = windows(len(tokens), seq_len, max_targets)
    # Full windows go in batches; a shorter last window goes alone.
    full = [s for s, n in spans if n == seq_len]
    groups = [(full[i : i + batch_size], seq_len) for i in range(0, len(full), batch_size)]
    groups += [([s], n) for s, n in spans if n < seq_len]
    bar = tqdm(groups, desc=name or "eval", unit="batch", disable=not progress, leave=False)
    for starts, length in bar:
        chunk = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
        if int(chunk.max()) >= vocab:
            raise MuonGPTError(
                f"{name}: token id {int(chunk.max())} is outside the model's vocabulary ({vocab})"
            )
        batch = torch.from_numpy(chunk).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = model(inputs)
        nats = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        ).double()
        is_text = targets.reshape(-1) != EOT_TOKEN
        result.tokens += targets.numel()
        result.nats += float(nats.sum())
        result.text_tokens += int(is_text.sum())
        result.text_nats += float(nats[is_text].sum())
        result.bytes += int(byte_lengths[chunk[:, 1:]].sum())
    return result


def evaluate_files(
    model,
    files: list[Path],
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    autocast: bool = False,
    progress: bool = False,
) -> tuple[list[EvalResult], EvalResult]:
    """Per-file results and their total; ``max_tokens`` caps the predicted tokens over all files."""
    results, total = [], EvalResult("total")
    for path in files:
        budget = None if max_tokens is None else max_tokens - total.tokens
        if budget is not None and budget <= 0:
            break
        tokens = load_tokens(path)
        if len(tokens) < 2:
            raise MuonGPTError(f"--data {path}: fewer than 2 tokens, nothing to predict")
        r = evaluate_tokens(
            model, tokens, seq_len, batch_size, path.name, budget, autocast, progress
        )
        results.append(r)
        total.add(r)
    return results, total


def format_table(results: list[EvalResult], total: EvalResult) -> str:
    rows = [(r.name, r) for r in results] + ([("total", total)] if len(results) > 1 else [])
    width = max(len(name) for name, _ in rows + [("data", None)])
    lines = [f"{'data':<{width}}  {'tokens':>12}  {'bytes':>13}  {'loss':>8}  {'bits/byte':>9}"]
    for name, r in rows:
        lines.append(
            f"{name:<{width}}  {r.tokens:>12,}  {r.bytes:>13,}  {r.loss:>8.4f}  "
            f"{r.bits_per_byte:>9.4f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--data", nargs="+", required=True, help=".bin shards and/or UTF-8 text files")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's training.seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on predicted tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="model.KEY=VALUE",
        help="model options that keep the weights, e.g. model.eval_window_factor=2",
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="also write JSON ('-': stdout only)"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from muongpt.generate import load_model, resolve_device

    for name in ("batch_size", "seq_len", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MuonGPTError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    files = [Path(f) for f in args.data]
    for f in files:
        if not f.is_file():
            raise MuonGPTError(f"--data: file not found: {f}")
    if args.json and args.json != "-":  # before the evaluation: a bad path should not cost it
        probe_file(args.json, "--json")
    from muongpt.cli.sample import model_file

    device = resolve_device(args.device)
    model, state = load_model(model_file(args.checkpoint), device, args.set)
    training = state["config"].get("training") or {}
    seq_len = args.seq_len or int(training.get("seq_len", 1024))
    autocast = device.type == "cuda" and bool(training.get("autocast_bf16", True))
    results, total = evaluate_files(
        model, files, seq_len, args.batch_size, args.max_tokens, autocast, sys.stderr.isatty()
    )  # a progress bar on a terminal; none in logs and pipes
    report = {
        "checkpoint": str(args.checkpoint),
        "step": state.get("step"),
        "seq_len": seq_len,
        "overrides": args.set,
        "files": [r.as_dict() for r in results],
        "total": total.as_dict(),
    }
    if args.json != "-":
        print(format_table(results, total))
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n", "--json")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in ("--task", "--harness") for a in argv):  # downstream tasks
        from muongpt.evals.cli import main as task_main

        return task_main(argv)
    args = parse_args(argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
