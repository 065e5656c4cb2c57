"""Corpus tokenizing on the real docs_sample / tinyshakespeare text, against tiktoken itself."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from muongpt.cli.data import main as data_main
from muongpt.data.corpus import CorpusError, tokenize_corpus
from muongpt.data.shards import open_shard, read_header
from muongpt.data.tokenizer import decode, get_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SRC = Path(__file__).resolve().parents[1] / "src"
EOT = 50256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} not found (shared data absent)")
    return path


@pytest.fixture(scope="module")
def docs_path() -> Path:
    return _need(DATA / "small" / "docs_sample.jsonl.xz")


@pytest.fixture(scope="module")
def docs(docs_path) -> list[str]:
    with lzma.open(docs_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def openai_gpt2() -> tiktoken.Encoding:
    """GPT-2 built independently from OpenAI's original encoder.json + vocab.bpe."""
    vocab, encoder = _need(DATA / "gpt2" / "vocab.bpe"), _need(DATA / "gpt2" / "encoder.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, cache nothing
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder))
    return tiktoken.Encoding(
        "gpt2-openai", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )


def read_stream(folder: Path) -> tuple[np.ndarray, list[Path]]:
    """All shards of a folder in stream order: the val shards, then the train shards (each split
    numbered from 000000)."""
    split_index = lambda p: (p.stem.split("_")[0] != "val", p.stem.split("_")[-1])
    shards = sorted(folder.glob("*.bin"), key=split_index)
    return np.concatenate([np.array(open_shard(p)) for p in shards]), shards


def split_documents(stream: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == EOT)
    assert starts[0] == 0
    return np.split(stream, starts[1:])


# ----------------------------------------------------------------------------- correctness


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "muongpt.cli.data", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


@pytest.fixture(scope="module")
def reference(docs) -> list[list[int]]:
    """tiktoken's GPT-2 on each document."""
    enc = get_tokenizer()
    return [enc.encode_ordinary(d) for d in docs]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, docs_path):
    """`muongpt data tokenize` on docs_sample with 2 processes, as a user would run it."""
    out = tmp_path_factory.mktemp("cli") / "shards"
    result = _cli("tokenize", str(docs_path), "--out", str(out), "--processes", "2",
                  "--shard-size", "300000", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, out


def test_docs_sample_tokens_equal_tiktoken_per_document(cli_run, docs, reference, openai_gpt2):
    result, out = cli_run
    stream, shards = read_stream(out)
    pieces = split_documents(stream)
    assert len(docs) == len(pieces) == 2000
    for text, expected, piece in zip(docs, reference, pieces, strict=True):
        assert piece[0] == EOT and piece[1:].tolist() == expected
        assert expected == openai_gpt2.encode_ordinary(text)
        assert decode(piece[1:]) == text  # lossless round trip
    # layout: the first shard is validation, then train shards numbered from 0; all full but the last
    names = [p.name for p in shards]
    assert names[:3] == ["val_000000.bin", "train_000000.bin", "train_000001.bin"]
    sizes = [read_header(p)[2] for p in shards]
    assert all(n == 300_000 for n in sizes[:-1]) and 0 < sizes[-1] <= 300_000
    # the summary
    tokens = sum(1 + len(r) for r in reference)
    summary = f"2,000 documents, {tokens:,} tokens, {len(shards)} shards (1 val, "
    assert summary in result.stdout and "tokens/s" in result.stdout and "MB/s" in result.stdout
    assert data_main(["inspect", str(shards[0])]) == 0


def test_output_is_deterministic_across_process_counts(tmp_path, docs_path, cli_run):
    one = tokenize_corpus([docs_path], tmp_path / "p1", shard_size=300_000, processes=1,
                          progress=False)  # fmt: skip
    two = sorted(cli_run[1].glob("*.bin"))
    assert [p.name for p in sorted(one.shards)] == [p.name for p in two]
    for a, b in zip(sorted(one.shards), two, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_val_fraction_takes_every_kth_document(tmp_path, docs):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:300]), encoding="utf-8")
    tokenize_corpus([src], tmp_path / "out", val_fraction=0.1, shard_size=20_000,
                    processes=1, progress=False)  # fmt: skip
    out = tmp_path / "out"
    val = np.concatenate([np.array(open_shard(p)) for p in sorted(out.glob("val_*.bin"))])
    train = np.concatenate([np.array(open_shard(p)) for p in sorted(out.glob("train_*.bin"))])
    enc = get_tokenizer()
    expect = lambda texts: [t for d in texts for t in [EOT, *enc.encode_ordinary(d)]]
    assert val.tolist() == expect(docs[:300:10])
    assert train.tolist() == expect([d for i, d in enumerate(docs[:300]) if i % 10])
    for split in ("val", "train"):  # each split numbered on its own, from 000000, no gaps
        names = sorted(p.name for p in out.glob(f"{split}_*.bin"))
        assert len(names) > 1 and names == [f"{split}_{i:06d}.bin" for i in range(len(names))]


def test_txt_whole_file_and_blank_line_paragraphs(tmp_path):
    shakespeare = _need(DATA / "small" / "tinyshakespeare.txt")
    text = shakespeare.read_text(encoding="utf-8")
    enc = get_tokenizer()
    tokenize_corpus([shakespeare], tmp_path / "whole", processes=1, progress=False)
    stream, shards = read_stream(tmp_path / "whole")
    assert [p.name for p in shards] == ["val_000000.bin"]  # smaller than one shard
    assert stream.tolist() == [EOT, *enc.encode_ordinary(text)]

    tokenize_corpus([shakespeare], tmp_path / "paras", split_blank_lines=True, processes=2,
                    progress=False)  # fmt: skip
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    pieces = split_documents(read_stream(tmp_path / "paras")[0])
    assert len(pieces) == len(paragraphs) > 7000
    for para, piece in zip(paragraphs, pieces, strict=True):
        assert decode(piece[1:]) == para


def test_compressed_and_parquet_inputs_match_plain(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    sample = docs[:150]
    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(sample))
    raw = lines.encode("utf-8")
    plain = tmp_path / "d.jsonl"
    plain.write_bytes(raw)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"id": list(range(150)), "body": sample}), tmp_path / "d.parquet")
    (tmp_path / "t.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))

    def tokens_of(name: str, **kw) -> list[int]:
        out = tmp_path / f"out_{name}"
        tokenize_corpus([tmp_path / name], out, processes=1, progress=False, **kw)
        return read_stream(out)[0].tolist()

    enc = get_tokenizer()
    expected = [t for d in sample for t in [EOT, *enc.encode_ordinary(d)]]
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.xz", "d.jsonl.zst", "d.parquet"):
        assert tokens_of(name, text_field="body") == expected, name
    assert tokens_of("t.txt.zst") == [EOT, *enc.encode_ordinary(lines)]  # one .txt document


# ----------------------------------------------------------------------------- bad input


def test_bad_json_line_keeps_written_shards(tmp_path, docs):
    good = tmp_path / "a_good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]), encoding="utf-8")
    bad = tmp_path / "b_bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n')
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as err:
        tokenize_corpus([good, bad], out, shard_size=50_000, processes=2, progress=False)
    assert str(err.value).startswith(f"{bad}:3: unreadable JSON")
    # every full shard of what came before the bad line is written, correct; nothing partial
    enc = get_tokenizer()
    expected = [t for d in [*docs[:200], "fine"] for t in [EOT, *enc.encode_ordinary(d)]]
    written = sorted(out.iterdir())
    assert all(p.suffix == ".bin" for p in written)
    assert len(written) == len(expected) // 50_000 >= 2
    stream, _ = read_stream(out)
    assert stream.tolist() == expected[: len(stream)]

    result = _cli("tokenize", str(good), str(bad), "--out", str(tmp_path / "cli"), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:3: unreadable JSON")


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl:2: no 'text' field"),
        ("notstr.jsonl", '{"text": 5}\n', "notstr.jsonl:1: a non-string (int) 'text' field"),
        ("array.jsonl", '["text"]\n', "array.jsonl:1: expected a JSON object"),
        ("latin1.txt", b"caf\xe9\n", "latin1.txt: not valid UTF-8"),
        ("trunc.jsonl.xz", lzma.compress(b'{"text": "x"}\n' * 1000)[:50], "trunc.jsonl.xz: cannot"),
        ("data.csv", "a,b\n", "data.csv: unsupported file type"),
    ],
)
def test_bad_inputs_give_one_line_naming_the_file(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorpusError) as err:
        tokenize_corpus([path], tmp_path / "out", processes=1, progress=False)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_existing_shards_are_not_mixed_in(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one\n\ntwo\n\nthree\n")
    out = tmp_path / "out"
    tokenize_corpus([src], out, split_blank_lines=True, shard_size=2, processes=1, progress=False)
    assert len(list(out.glob("*.bin"))) == 3
    with pytest.raises(CorpusError, match="already holds 3 shards"):
        tokenize_corpus([src], out, processes=1, progress=False)
    tokenize_corpus([src], out, processes=1, progress=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["val_000000.bin"]
    assert decode(open_shard(out / "val_000000.bin")[1:]) == "one\n\ntwo\n\nthree\n"


def test_missing_parquet_column_and_missing_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "id": [1, 2]}), path)
    with pytest.raises(CorpusError, match=r"t\.parquet: no column 'text' \(columns: content, id\)"):
        tokenize_corpus([path], tmp_path / "out", processes=1, progress=False)
    assert data_main(["tokenize", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope.jsonl'}: file not found\n"
