"""Tokenize any text corpus into .bin shards (GPT-2 BPE, every document prefixed by EOT 50256).

Inputs, by file name:
    *.txt                   the whole file is one document, or (split_blank_lines=True) every run
                            of non-blank lines is one (blank = empty or whitespace-only)
    *.jsonl                 one JSON object per line; the document is its ``text_field``
    *.parquet               the ``text_field`` column, read in record batches with pyarrow
    + .gz / .xz / .zst      compressed .txt and .jsonl
A folder stands for the supported files under it (recursively, sorted). Empty documents are
skipped.

Output: shards of ``shard_size`` tokens (the last of each split shorter), named
``val_000000.bin``, ``val_000001.bin``, ... and ``train_000000.bin``, ``train_000001.bin``, ...,
each split numbered on its own (a listing of the folder keeps the splits apart). The validation
split is the first ``shard_size`` tokens (val_fraction=None), or every round(1/val_fraction)-th
document (a spread-out sample; needs no knowledge of the corpus size). A document may straddle
two shards of its split, as in llm.c. Output is a pure function of the inputs and options: the
workers tokenize batches of documents in parallel but results are taken back in input order.
Each shard is written atomically, so an error on bad input leaves the shards already written
intact and never a partial file.
"""

from __future__ import annotations

import collections
import gzip
import json
import lzma
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muongpt import MuonGPTError
from muongpt.data.shards import write_shard
from muongpt.data.tokenizer import EOT_TOKEN, get_tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")
COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst")
DEFAULT_SHARD_SIZE = 100_000_000  # tokens, as the FineWeb shards (200 MB)
_BATCH_CHARS = 1 << 20  # documents are sent to the workers in batches of about 1M characters
_BATCH_DOCS = 512


class CorpusError(MuonGPTError):
    """Unreadable or malformed corpus input."""


@dataclass
class TokenizeSummary:
    documents: int
    tokens: int
    text_bytes: int  # UTF-8 bytes of document text tokenized
    shards: list[Path]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        val = sum(p.name.startswith("val_") for p in self.shards)
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens, "
            f"{len(self.shards)} shards ({val} val, {len(self.shards) - val} train) in "
            f"{self.seconds:.1f} s: {self.tokens_per_s:,.0f} tokens/s, "
            f"{self.mb_per_s:.2f} MB/s of text"
        )


# ----------------------------------------------------------------------------- reading documents


def corpus_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand the inputs (files or folders) to the list of files to read, in order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None)
            if not found:
                raise CorpusError(f"{p}: folder holds no .txt/.jsonl/.parquet files")
            files.extend(found)
        elif not p.is_file():
            raise CorpusError(f"{p}: file not found")
        elif _kind(p) is None:
            raise CorpusError(
                f"{p}: unsupported file type (expected .txt, .jsonl or .parquet, "
                "optionally .gz/.xz/.zst for the first two)"
            )
        else:
            files.append(p)
    if not files:
        raise CorpusError("no input files given")
    return files


def _kind(path: Path) -> str | None:
    """'txt', 'jsonl' or 'parquet' from the file name (None when unsupported)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TEXT_SUFFIXES:
        return suffixes[-1][1:]
    if path.suffix.lower() == ".parquet":
        return "parquet"
    return None


def _open_text(path: Path):
    """Open a possibly compressed text file for reading as UTF-8 (strict)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", newline="")
    if suffix == ".zst":
        import zstandard

        return zstandard.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def iter_documents(
    path: Path, *, text_field: str = "text", split_blank_lines: bool = False
) -> Iterator[str]:
    """Yield the documents of one file, raising CorpusError that names the file (and line)."""
    kind = _kind(path)
    try:
        if kind == "parquet":
            yield from _parquet_documents(path, text_field)
            return
        with _open_text(path) as f:
            if kind == "jsonl":
                yield from _jsonl_documents(f, path, text_field)
            elif split_blank_lines:
                yield from _paragraphs(f)
            else:
                yield f.read()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except _read_errors() as e:
        raise CorpusError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'this file cannot be read' (I/O, truncated or corrupt compression).
    zstandard is needed only for .zst files: without it, the others still get their own errors."""
    try:
        import zstandard
    except ImportError:
        return (OSError, EOFError, lzma.LZMAError)
    return (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


def _jsonl_documents(f, path: Path, text_field: str) -> Iterator[str]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{line_no}: unreadable JSON ({e.msg})") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise CorpusError(f"{path}:{line_no}: expected a JSON object, got a JSON {kind}")
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = "no" if text_field not in record else f"a non-string ({type(text).__name__})"
            raise CorpusError(f"{path}:{line_no}: {problem} '{text_field}' field")
        yield text


def _paragraphs(f) -> Iterator[str]:
    """Runs of non-blank lines, joined with their newlines (the last newline dropped)."""
    lines: list[str] = []
    for line in f:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).removesuffix("\n").removesuffix("\r")
            lines = []
    if lines:
        yield "".join(lines).removesuffix("\n").removesuffix("\r")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                what = f"row {row} of column '{text_field}'"
                raise CorpusError(f"{path}: {what} is not text but {type(text).__name__}")
            row += 1
            yield text


def _doc_batches(files: list[Path], text_field: str, split_blank_lines: bool):
    """Group documents into batches for the workers (bounded by documents and characters)."""
    batch: list[str] = []
    chars = 0
    try:
        for path in files:
            for doc in iter_documents(
                path, text_field=text_field, split_blank_lines=split_blank_lines
            ):
                if not doc:
                    continue
                batch.append(doc)
                chars += len(doc)
                if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                    yield batch
                    batch, chars = [], 0
    except CorpusError:
        if batch:  # the documents before the bad input still count (see _ordered_results)
            yield batch
        raise
    if batch:
        yield batch


# ----------------------------------------------------------------------------- tokenizing


def encode_documents(docs: list[str]) -> tuple[list[np.ndarray], int]:
    """[EOT] + GPT-2 tokens of each document (uint16), and the documents' UTF-8 byte count."""
    enc = get_tokenizer()
    out = []
    for doc in docs:
        ids = enc.encode_ordinary(doc)
        tokens = np.empty(len(ids) + 1, dtype=np.uint16)
        tokens[0] = EOT_TOKEN
        tokens[1:] = ids
        out.append(tokens)
    return out, sum(len(d.encode("utf-8")) for d in docs)


def _ordered_results(batches, processes: int):
    """Encode batches on ``processes`` workers; yield results in input order, bounded in memory.

    Unlike Pool.imap (whose feeder thread drains the whole input eagerly), at most a few batches
    per worker are in flight, so a corpus larger than memory streams through.
    """
    if processes <= 1:
        for batch in batches:
            yield encode_documents(batch)
        return
    get_tokenizer()  # load the BPE once here: forked workers inherit it
    with multiprocessing.get_context().Pool(processes) as pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in batches:
                pending.append(pool.apply_async(encode_documents, (batch,)))
                if len(pending) >= 4 * processes:
                    yield pending.popleft().get()
        except CorpusError:  # bad input: what was read before it is still written
            while pending:
                yield pending.popleft().get()
            raise
        while pending:
            yield pending.popleft().get()


class _ShardWriter:
    """Accumulates the token stream of one split and writes full shards as they fill."""

    def __init__(self, split: str, out_dir: Path, shard_size: int, counter: list[int]):
        self.split, self.out_dir, self.shard_size = split, out_dir, shard_size
        self.counter = counter
        self.parts: list[np.ndarray] = []
        self.size = 0  # tokens buffered, not yet written
        self.total = 0  # tokens ever added
        self.written: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        self.parts.append(tokens)
        self.size += len(tokens)
        self.total += len(tokens)
        while self.size >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        if self.size:
            self._write(self.size)

    def _write(self, n: int) -> None:
        stream = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        path = self.out_dir / f"{self.split}_{self.counter[0]:06d}.bin"
        write_shard(path, stream[:n])
        self.counter[0] += 1
        self.written.append(path)
        self.parts = [stream[n:]] if n < len(stream) else []
        self.size -= n


def tokenize_corpus(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_fraction: float | None = None,
    text_field: str = "text",
    split_blank_lines: bool = False,
    processes: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TokenizeSummary:
    """Tokenize the inputs into shards in ``out_dir``; see the module doc.

    Shards already in ``out_dir`` (val_*.bin, train_*.bin) would mix with the new ones, so they
    are an error unless ``overwrite`` (which deletes them first).
    """
    if shard_size < 1:
        raise CorpusError(f"shard_size must be >= 1 token, got {shard_size}")
    if val_fraction is not None and not 0 < val_fraction <= 0.5:
        raise CorpusError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    files = corpus_files(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted([*out_dir.glob("val_*.bin"), *out_dir.glob("train_*.bin")])
    if old and not overwrite:
        raise CorpusError(
            f"{out_dir} already holds {len(old)} shards ({old[0].name}, ...): "
            "choose another folder or overwrite them"
        )
    for path in old:
        path.unlink()
    processes = processes or min(os.cpu_count() or 1, 8)
    val_every = None if val_fraction is None else max(1, round(1 / val_fraction))

    from tqdm import tqdm

    val = _ShardWriter("val", out_dir, shard_size, [0])  # each split counts its own shards
    train = _ShardWriter("train", out_dir, shard_size, [0])
    docs = tokens = text_bytes = 0
    start = time.perf_counter()
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    try:
        batches = _doc_batches(files, text_field, split_blank_lines)
        for encoded, nbytes in _ordered_results(batches, processes):
            batch_tokens = 0
            for doc in encoded:
                if val_every is not None:
                    (val if docs % val_every == 0 else train).add(doc)
                else:  # the first shard_size tokens of the stream are the validation split
                    room = shard_size - val.total
                    if room > 0:
                        val.add(doc[:room])
                    if len(doc) > room:
                        train.add(doc[max(room, 0) :])
                docs += 1
                batch_tokens += len(doc)
            tokens += batch_tokens
            text_bytes += nbytes
            bar.update(batch_tokens)
            bar.set_postfix(docs=docs, shards=val.counter[0] + train.counter[0], refresh=False)
        val.flush()
        train.flush()
    finally:
        bar.close()
    if docs == 0:  # exit 0 with "0 shards" would look like success
        raise CorpusError(
            f"no documents in {', '.join(map(str, inputs))} (every file is empty or blank); "
            "no shards written"
        )
    return TokenizeSummary(
        documents=docs,
        tokens=tokens,
        text_bytes=text_bytes,
        shards=val.written + train.written,  # val shards first, each split in index order
        seconds=time.perf_counter() - start,
    )
