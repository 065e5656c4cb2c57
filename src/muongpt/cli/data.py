"""`muongpt data ...`: download FineWeb, tokenize a corpus into shards, inspect shards.

muongpt data fineweb [--repo fineweb10B] [--train-shards N] [--out DIR]
muongpt data tokenize INPUT... --out DIR [--text-field text] [--split-blank-lines]
                      [--shard-size TOKENS] [--val-fraction F] [--processes P]
muongpt data inspect FILE... [--excerpt TOKENS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from muongpt import MuonGPTError
from muongpt.cli import probe_dir, report_errors

_SCAN_CHUNK = 1 << 24  # tokens per numpy pass for min/max


def _fineweb(args: argparse.Namespace) -> int:
    from muongpt.data.fineweb import download_fineweb, get_repo

    out = args.out or f"data/{get_repo(args.repo).repo_id.split('/')[-1].removesuffix('-gpt2')}"
    probe_dir(out, "--out")
    paths, skipped = download_fineweb(
        out,
        repo=args.repo,
        train_shards=args.train_shards,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    fetched = len(paths) - skipped
    print(f"{len(paths)} shards in {out} ({skipped} already present, {fetched} fetched)")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from muongpt.data.corpus import tokenize_corpus

    probe_dir(args.out, "--out")
    summary = tokenize_corpus(
        args.inputs,
        args.out,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        split_blank_lines=args.split_blank_lines,
        processes=args.processes,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"{summary}\nshards in {args.out}: {', '.join(p.name for p in summary.shards)}")
    if summary.tokens and not any(p.name.startswith("train_") for p in summary.shards):
        print(
            "warning: every token went to the validation split (the corpus is smaller than one "
            "--shard-size); use --val-fraction or a smaller --shard-size to get training shards",
            file=sys.stderr,
        )
    return 0


def inspect_shard(path: str | Path, excerpt_tokens: int = 48) -> str:
    """A few lines describing one shard: header, size, id range, documents, decoded excerpt."""
    from muongpt.data.shards import open_shard, read_header
    from muongpt.data.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, decode

    magic, version, count = read_header(path)
    tokens = open_shard(path)
    lo, hi, docs = None, None, 0
    for start in range(0, count, _SCAN_CHUNK):
        chunk = np.asarray(tokens[start : start + _SCAN_CHUNK])
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
        docs += int(np.count_nonzero(chunk == EOT_TOKEN))
    lines = [
        f"{path}",
        f"  header: magic {magic}, version {version}, {count:,} tokens "
        f"({Path(path).stat().st_size:,} bytes)",
    ]
    if count:
        lines.append(f"  token ids: min {lo}, max {hi}; {docs:,} end-of-text tokens (documents)")
        if hi >= GPT2_VOCAB_SIZE:
            lines.append(f"  warning: max id {hi} >= {GPT2_VOCAB_SIZE}, not GPT-2 tokens")
        else:
            head = tokens[:excerpt_tokens]
            lines.append(f"  first {len(head)} tokens: {decode(head)!r}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            print(inspect_shard(path, args.excerpt))
        except MuonGPTError as e:  # report every bad file, keep going
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muongpt data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fineweb", help="download pre-tokenized GPT-2 FineWeb shards")
    p.add_argument(
        "--repo",
        default="fineweb10B",
        help="fineweb10B (kjj0/fineweb10B-gpt2), fineweb100B or finewebedu10B, or a repo id",
    )
    p.add_argument("--train-shards", type=int, default=None, help="train shards (default: all)")
    p.add_argument("--out", default=None, help="folder (default: data/<dataset>, e.g. fineweb10B)")
    p.add_argument("--cache-dir", default=None, help="hub cache (default: HF_HUB_CACHE)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_fineweb)

    p = sub.add_parser("tokenize", help="tokenize .txt/.jsonl/.parquet (or .gz/.xz/.zst) files")
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--out", required=True, help="output folder for the .bin shards")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column (text)")
    p.add_argument(
        "--split-blank-lines", action="store_true", help=".txt: one document per paragraph"
    )
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="every round(1/F)-th document to validation (default: the first shard)",
    )
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: CPUs)")
    p.add_argument("--overwrite", action="store_true", help="delete shards already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("inspect", help="header, token count, id range and an excerpt of shards")
    p.add_argument("files", nargs="+")
    p.add_argument("--excerpt", type=int, default=48, help="tokens to decode (default 48)")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
