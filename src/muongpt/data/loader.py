"""The training loader: memory-mapped shards -> (inputs, targets) batches on the device.

All sources (shard files, or in-memory token arrays, bare or as ``(name, array)`` pairs whose
name the errors use) are read as ONE stream, concatenated in order. Every call to ``next()``
consumes one *global* batch of ``world_size * B * T`` tokens:

    stream:  ... | rank 0: B*T tokens | rank 1: B*T tokens | ... | rank W-1: B*T | +1 | ...
                 ^ position                                                          ^ next position

and rank r keeps only its own slice (plus one token, for the shifted targets). Because the
position is a single global token offset, a state saved at an optimizer-step boundary resumes
exactly on any world size whose global batch is the same (2 ranks x B == 1 rank x 2 steps of B).
``set_seq_len`` changes T between batches (a row-length schedule): the next batch starts where
the last one taken ended, so the state needs nothing more.

Epochs: a pass ends when the next global batch does not fit in what is left of the stream (the
partial tail is dropped, the next pass restarts at token 0). ``epochs=None`` loops forever.

``align_to_bos=True``: every row starts at a document start (an end-of-text token 50256, which
begins each document). Rows are laid down in global order (rank 0's rows, then rank 1's, ...):
row i starts at the first BOS at or after ``start[i-1] + T`` (the first at or after the
position, for row 0), and holds T+1 contiguous tokens, which may span several documents. The
tokens between the end of a row and the next document start are skipped; a document longer
than T is truncated to its first T+1 tokens. The global order makes the world-size property
hold in this mode too.

Validation: shard headers are checked when the loader is built. With ``vocab_size`` set, each
source's largest token id is checked the first time a batch reads from it (a chunked numpy
max: ~0.05 s per 100M-token shard); a bad id raises from ``next()``.
"""

from __future__ import annotations

import bisect
import glob
import queue
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from muongpt import MuonGPTError
from muongpt.data.shards import open_shard, read_header, resolve_shards
from muongpt.data.tokenizer import EOT_TOKEN

BOS_TOKEN = EOT_TOKEN  # every document starts with the end-of-text token
STATE_VERSION = 1
_CHECK_CHUNK = 1 << 24  # tokens per numpy pass when scanning a source (32 MiB of uint16)


class LoaderError(MuonGPTError):
    """Bad loader input: no sources, too little data, a token id out of range, a bad state."""


@dataclass
class _Source:
    """One part of the stream: a shard file (memory-mapped on first use) or an in-memory array."""

    name: str
    num_tokens: int
    path: Path | None = None
    tokens: np.ndarray | None = None
    scanned: bool = False  # vocab check + document-start index done
    bos: np.ndarray | None = None  # offsets of BOS tokens inside this source (align_to_bos only)


class TokenStream:
    """The sources concatenated into one read-only token stream with global offsets."""

    def __init__(self, sources, *, vocab_size: int | None = None, index_bos: bool = False):
        self.vocab_size = vocab_size
        self.index_bos = index_bos
        self.sources = [_make_source(s, i) for i, s in enumerate(_expand_sources(sources))]
        if not self.sources:
            raise LoaderError("no data sources given (the list of shards is empty)")
        lengths = [s.num_tokens for s in self.sources]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()  # starts[i]..starts[i+1]
        self.num_tokens = self.starts[-1]
        self._lock = threading.Lock()  # lazy opening/scanning may happen from two threads

    def describe(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0].name
        return f"{self.sources[0].name} ... {self.sources[-1].name} ({len(self.sources)} sources)"

    def _tokens(self, i: int) -> np.ndarray:
        src = self.sources[i]
        with self._lock:
            if src.tokens is None:
                src.tokens = open_shard(src.path)
            if not src.scanned:
                self._scan(src)
        return src.tokens

    def _scan(self, src: _Source) -> None:
        """One chunked pass over a source: check token ids, index document starts."""
        tokens, bos = src.tokens, []
        for lo in range(0, len(tokens), _CHECK_CHUNK):
            chunk = np.asarray(tokens[lo : lo + _CHECK_CHUNK])
            if self.vocab_size is not None and chunk.size:
                hi = int(chunk.max())
                if hi >= self.vocab_size or int(chunk.min()) < 0:
                    bad = int(np.flatnonzero((chunk >= self.vocab_size) | (chunk < 0))[0])
                    raise LoaderError(
                        f"{src.name}: token id {int(chunk[bad])} at position {lo + bad} is outside "
                        f"the vocabulary [0, {self.vocab_size})"
                    )
            if self.index_bos:
                bos.append(np.flatnonzero(chunk == BOS_TOKEN) + lo)
        if self.index_bos:
            src.bos = np.concatenate(bos) if bos else np.zeros(0, dtype=np.int64)
        src.scanned = True

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill the 1-D array ``out`` with stream[start : start + len(out)], across sources."""
        n, done = len(out), 0
        i = bisect.bisect_right(self.starts, start) - 1
        while done < n:
            tokens = self._tokens(i)
            lo = start + done - self.starts[i]
            take = min(n - done, len(tokens) - lo)
            np.copyto(out[done : done + take], tokens[lo : lo + take], casting="unsafe")
            done += take
            i += 1

    def document_starts(self) -> int:
        """How many end-of-text tokens the stream holds (``index_bos`` only)."""
        for i in range(len(self.sources)):
            self._tokens(i)  # opens and scans the source: its document starts are indexed
        return sum(len(src.bos) for src in self.sources)

    def next_bos(self, pos: int) -> int | None:
        """Global offset of the first document start at or after ``pos`` (None if there is none)."""
        i = bisect.bisect_right(self.starts, pos) - 1
        while i < len(self.sources):
            self._tokens(i)
            bos = self.sources[i].bos
            j = int(np.searchsorted(bos, pos - self.starts[i])) if pos > self.starts[i] else 0
            if j < len(bos):
                return self.starts[i] + int(bos[j])
            i += 1
        return None


def _expand_sources(sources) -> list:
    """Strings that name a folder or contain a glob become the sorted shards they match."""
    if isinstance(sources, (str, Path)):
        return list(resolve_shards(sources))
    if isinstance(sources, np.ndarray):
        return [sources]
    out = []
    for s in sources:
        if isinstance(s, (str, Path)) and (Path(s).is_dir() or glob.has_magic(str(s))):
            out.extend(resolve_shards(s))
        else:
            out.append(s)
    return out


def _make_source(s, index: int) -> _Source:
    if isinstance(s, (str, Path)):
        _, _, count = read_header(s)  # raises ShardError naming the file
        return _Source(name=str(s), num_tokens=count, path=Path(s))
    name = f"array[{index}]"
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
        name, s = s
    arr = np.asarray(s)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise LoaderError(
            f"source {index}: expected a shard path or a 1-D integer token array, "
            f"got {type(s).__name__} of shape {arr.shape} and dtype {arr.dtype}"
        )
    return _Source(name=name, num_tokens=len(arr), tokens=arr)


@dataclass(frozen=True)
class _Cursor:
    epoch: int  # completed passes over the stream
    position: int  # global token offset of the next global batch
    tokens_consumed: int  # global tokens handed out since the start of training


class _BatchMaker:
    """Pure batch arithmetic: cursor -> (this rank's batch, next cursor). Used by one thread."""

    def __init__(self, stream: TokenStream, B: int, T: int, rank: int, world_size: int,
                 align_to_bos: bool, epochs: int | None, pin: bool):  # fmt: skip
        self.stream, self.B, self.T = stream, B, T
        self.rank, self.world_size = rank, world_size
        self.align_to_bos, self.epochs, self.pin = align_to_bos, epochs, pin

    def exhausted(self, cur: _Cursor) -> bool:
        return self.epochs is not None and cur.epoch >= self.epochs

    def _row_starts(self, position: int) -> tuple[list[int], int] | None:
        """Start of every row of the global batch, and the next position; None at end of pass."""
        B, T, W, n = self.B, self.T, self.world_size, self.stream.num_tokens
        if not self.align_to_bos:
            if position + W * B * T + 1 > n:
                return None
            return [position + g * T for g in range(W * B)], position + W * B * T
        starts, p = [], position
        for _ in range(W * B):
            s = self.stream.next_bos(p)
            if s is None or s + T + 1 > n:
                return None
            starts.append(s)
            p = s + T
        return starts, p

    def make(self, cur: _Cursor) -> tuple[torch.Tensor, _Cursor] | None:
        """Return (tokens (2, B, T) int64: inputs then targets, cursor after), None when done."""
        if self.exhausted(cur):
            return None
        rows = self._row_starts(cur.position)
        if rows is None and cur.position > 0:  # end of a pass: drop the tail, restart at 0
            cur = _Cursor(cur.epoch + 1, 0, cur.tokens_consumed)
            if self.exhausted(cur):
                return None
            rows = self._row_starts(0)
        if rows is None:  # not one batch in a whole pass (only possible with align_to_bos)
            raise LoaderError(
                f"{self.stream.describe()}: no room for one BOS-aligned batch: data.align_to_bos "
                f"needs {self.world_size * self.B} rows of {self.T + 1} tokens, each starting at an "
                f"end-of-text token ({BOS_TOKEN}), and the data's {self.stream.num_tokens} tokens "
                f"hold {self.stream.document_starts()} of them"
            )
        starts, next_position = rows
        mine = starts[self.rank * self.B : (self.rank + 1) * self.B]
        batch = torch.empty((2, self.B, self.T), dtype=torch.int64, pin_memory=self.pin)
        out = batch.numpy()
        if self.align_to_bos:
            for b, s in enumerate(mine):
                self.stream.read_into(s, out[0, b])
                self.stream.read_into(s + 1, out[1, b])
        else:  # this rank's rows are contiguous: two reads of B*T tokens
            self.stream.read_into(mine[0], out[0].reshape(-1))
            self.stream.read_into(mine[0] + 1, out[1].reshape(-1))
        consumed = cur.tokens_consumed + self.world_size * self.B * self.T
        return batch, _Cursor(cur.epoch, next_position, consumed)


class _Prefetcher:
    """A daemon thread that keeps ``depth`` batches ready ahead of the consumer."""

    _END = object()

    def __init__(self, maker: _BatchMaker, cursor: _Cursor, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.final = None  # the end marker or the error, once the thread has sent it
        self.thread = threading.Thread(
            target=_prefetch_loop, args=(maker, cursor, self.queue, self.stop), daemon=True,
            name="muongpt-loader-prefetch",
        )  # fmt: skip
        self.thread.start()

    def get(self):
        item = self.final if self.final is not None else self.queue.get()
        if item is self._END or isinstance(item, BaseException):
            self.final = item  # the thread has finished: answer the same from now on
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


def _prefetch_loop(maker: _BatchMaker, cur: _Cursor, q: queue.Queue, stop: threading.Event):
    # Holds no reference to the loader, so a dropped loader is garbage collected and stops this.
    while not stop.is_set():
        try:
            made = maker.make(cur)
        except BaseException as e:  # handed to the consumer, raised from next()
            made, item = None, e
        else:
            item = _Prefetcher._END if made is None else made
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                pass
        if made is None:
            return
        cur = made[1]


class TokenLoader:
    """Distributed, resumable (inputs, targets) batches from token shards; see the module doc."""

    def __init__(
        self,
        sources: str | Path | Sequence,
        micro_batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        align_to_bos: bool = False,
        epochs: int | None = None,
        prefetch: bool = True,
        vocab_size: int | None = None,
    ):
        if micro_batch_size < 1:
            raise LoaderError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs < 1:
            raise LoaderError(f"epochs must be >= 1 or None (forever), got {epochs}")
        self.B = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.align_to_bos, self.epochs, self.prefetch = align_to_bos, epochs, prefetch
        self.device = torch.device(device)
        self.stream = TokenStream(sources, vocab_size=vocab_size, index_bos=align_to_bos)
        self._cursor = _Cursor(0, 0, 0)  # what the consumer has taken: the resumable state
        self._prefetcher: _Prefetcher | None = None
        self.T = 0
        self.set_seq_len(seq_len)

    def set_seq_len(self, seq_len: int) -> None:
        """Rows of ``seq_len`` tokens from the next batch on (a row-length schedule). Batches
        made ahead at the old length are dropped: the next one starts at the consumer's cursor,
        so the stream is read without a gap or a repeat."""
        if seq_len == self.T:
            return
        if seq_len < 1:
            raise LoaderError(f"seq_len must be >= 1, got {seq_len}")
        need = self.world_size * self.B * seq_len + 1
        if self.stream.num_tokens < need:
            raise LoaderError(
                f"{self.stream.describe()}: {self.stream.num_tokens} tokens, shorter than one "
                f"global batch of {need} (world_size {self.world_size} x batch {self.B} x "
                f"seq_len {seq_len} + 1)"
            )
        self.close()
        self.T = seq_len
        self.tokens_per_batch = need - 1
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._maker = _BatchMaker(
            self.stream, self.B, seq_len, self.rank, self.world_size, self.align_to_bos,
            self.epochs, pin,
        )  # fmt: skip

    @property
    def batches_per_epoch(self) -> int | None:
        """Global batches in one pass (None with align_to_bos, where it depends on the data)."""
        if self.align_to_bos:
            return None
        return (self.stream.num_tokens - 1) // self.tokens_per_batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._maker, self._cursor)
                # A dropped loader (or interpreter exit) stops and joins the thread: a daemon
                # thread still inside torch while Python shuts down can abort the process.
                self._finalizer = weakref.finalize(self, self._prefetcher.close)
            made = self._prefetcher.get()
        else:
            made = self._maker.make(self._cursor)
        if made is None:
            raise StopIteration
        batch, self._cursor = made
        if self.device.type != "cpu":
            batch = batch.to(self.device, non_blocking=True)  # pinned -> async copy
        return batch[0], batch[1]

    def close(self) -> None:
        """Stop the prefetch thread (a new one starts on the next ``next()``)."""
        if self._prefetcher is not None:
            self._finalizer()  # runs _prefetcher.close once
            self._prefetcher = None

    def state_dict(self) -> dict:
        """The position after the last batch the consumer took (plain ints, strs and lists)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._cursor.epoch,
            "position": self._cursor.position,
            "tokens_consumed": self._cursor.tokens_consumed,
            "align_to_bos": int(self.align_to_bos),
            "sources": [s.name for s in self.stream.sources],
            "source_tokens": [s.num_tokens for s in self.stream.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the batch at which ``state`` was taken (any world size)."""
        try:
            version = int(state["version"])
            epoch, position = int(state["epoch"]), int(state["position"])
            consumed = int(state.get("tokens_consumed", 0))
            saved_lengths = [int(n) for n in state["source_tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise LoaderError(f"not a TokenLoader state dict ({type(e).__name__}: {e})") from None
        if version != STATE_VERSION:
            raise LoaderError(f"loader state version {version}, expected {STATE_VERSION}")
        if not 0 <= position <= self.stream.num_tokens or epoch < 0:
            raise LoaderError(
                f"loader state position {position} (epoch {epoch}) is outside the "
                f"{self.stream.num_tokens}-token stream of {self.stream.describe()}"
            )
        # The saved position must mean the same tokens: the sources it covers must be unchanged
        # (appending shards after them is fine).
        lengths = [s.num_tokens for s in self.stream.sources]
        covered = bisect.bisect_right(np.cumsum(saved_lengths).tolist(), position) + 1
        if lengths[:covered] != saved_lengths[:covered]:
            raise LoaderError(
                f"loader state was saved on different data (source sizes {saved_lengths[:covered]}"
                f" vs {lengths[:covered]} now for {self.stream.describe()})"
            )
        self.close()
        self._cursor = _Cursor(epoch, position, consumed)
