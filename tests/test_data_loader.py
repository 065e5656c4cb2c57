"""TokenLoader against plain numpy reference implementations, on the real bench val shard."""

from __future__ import annotations

import io
import itertools
import lzma
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from muongpt.data.loader import LoaderError, TokenLoader
from muongpt.data.shards import ShardError, open_shard, write_shard

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EOT = 50256


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """The real 2M-token bench val shard, cut into 3 shards of unequal size."""
    src = DATA / "bench" / "val_000000.bin.xz"
    if not src.is_file():
        pytest.skip(f"{src} not found (shared data absent)")
    folder = tmp_path_factory.mktemp("loader")
    whole = folder / "whole.bin"
    with lzma.open(src) as f, open(whole, "wb") as g:
        shutil.copyfileobj(f, g)
    tokens = np.array(open_shard(whole))
    whole.unlink()
    cuts = [0, 700_001, 1_350_000, len(tokens)]
    return [
        write_shard(folder / f"train_{i:06d}.bin", tokens[a:b])
        for i, (a, b) in enumerate(itertools.pairwise(cuts))
    ]


@pytest.fixture(scope="module")
def stream(shards) -> np.ndarray:
    return np.concatenate([np.array(open_shard(p), dtype=np.int64) for p in shards])


# ----------------------------------------------------------------------------- references


def reference_batches(stream: np.ndarray, W: int, B: int, T: int, rank: int):
    """One pass, modded-nanogpt style: global batch k is stream[k*W*B*T : ... + W*B*T + 1]."""
    G = W * B * T
    for p in range(0, len(stream) - G, G):
        chunk = stream[p + rank * B * T : p + (rank + 1) * B * T + 1]
        yield chunk[:-1].reshape(B, T), chunk[1:].reshape(B, T)


def reference_aligned(stream: np.ndarray, W: int, B: int, T: int, rank: int):
    """One pass of BOS-aligned rows: each row starts at the first EOT at/after previous + T."""
    bos = np.flatnonzero(stream == EOT)
    pos = 0
    while True:
        rows, p = [], pos
        for _ in range(W * B):
            j = np.searchsorted(bos, p)
            if j == len(bos) or bos[j] + T + 1 > len(stream):
                return
            rows.append(stream[bos[j] : bos[j] + T + 1])
            p = bos[j] + T
        pos = p
        mine = np.stack(rows[rank * B : (rank + 1) * B])
        yield mine[:, :-1], mine[:, 1:]


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("prefetch", [True, False])
def test_one_epoch_equals_reference(shards, stream, prefetch):
    B, T = 8, 256
    loader = TokenLoader(shards, B, T, epochs=1, prefetch=prefetch)
    got = list(loader)
    ref = list(reference_batches(stream, 1, B, T, 0))
    assert len(got) == len(ref) == loader.batches_per_epoch == (len(stream) - 1) // (B * T)
    for (x, y), (rx, ry) in zip(got, ref, strict=True):
        assert x.dtype == y.dtype == torch.int64 and x.shape == (B, T)
        assert np.array_equal(x.numpy(), rx) and np.array_equal(y.numpy(), ry)


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3])
def test_ranks_cover_exactly_the_single_rank_tokens(shards, stream, W, align):
    B, T = 4, 256
    ranks = [
        TokenLoader(shards, B, T, rank=r, world_size=W, epochs=1, align_to_bos=align)
        for r in range(W)
    ]
    single = TokenLoader(shards, W * B, T, epochs=1, align_to_bos=align)
    reference = reference_aligned if align else reference_batches
    ref = list(reference(stream, W, B, T, 0))
    steps = 0
    for (x1, y1), *parts in zip(single, *ranks, strict=True):
        assert torch.equal(torch.cat([x for x, _ in parts]), x1)
        assert torch.equal(torch.cat([y for _, y in parts]), y1)
        assert np.array_equal(parts[0][0].numpy(), ref[steps][0])  # rank 0 vs the reference
        if align:
            assert bool((x1[:, 0] == EOT).all())
        steps += 1
    assert steps == len(ref) > 100
    assert all(r.tokens_per_batch == W * B * T for r in ranks)


def test_aligned_batches_equal_reference_for_each_rank(shards, stream):
    B, T, W = 2, 512, 2
    for rank in range(W):
        got = list(TokenLoader(shards, B, T, rank=rank, world_size=W, epochs=1, align_to_bos=True))
        ref = list(reference_aligned(stream, W, B, T, rank))
        assert len(got) == len(ref)
        for (x, y), (rx, ry) in zip(got, ref, strict=True):
            assert np.array_equal(x.numpy(), rx) and np.array_equal(y.numpy(), ry)


def test_exhausted_loader_keeps_raising_stop_iteration(shards):
    for prefetch in (True, False):
        loader = TokenLoader(shards, 64, 1024, epochs=1, prefetch=prefetch)
        assert len(list(loader)) == loader.batches_per_epoch
        for _ in range(3):
            with pytest.raises(StopIteration):
                next(loader)


def test_epochs(shards):
    B, T = 16, 1024
    two = list(TokenLoader(shards, B, T, epochs=2))
    n = TokenLoader(shards, B, T).batches_per_epoch
    assert len(two) == 2 * n
    for (x0, y0), (x1, y1) in zip(two[:n], two[n:], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    forever = TokenLoader(shards, B, T)  # epochs=None keeps going
    batches = take(forever, 2 * n + 3)
    assert torch.equal(batches[2 * n + 2][0], two[2][0])
    assert forever.state_dict()["epoch"] == 2


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("k", [1, 37, 122])
def test_resume_gives_the_very_next_batch(shards, k, align):
    B, T = 4, 1024
    full = take(TokenLoader(shards, B, T, epochs=3, align_to_bos=align), k + 3)
    loader = TokenLoader(shards, B, T, epochs=3, align_to_bos=align)
    take(loader, k)
    time.sleep(0.05)  # let the prefetch thread run ahead of the consumer
    state = roundtrip(loader.state_dict())
    if not align:
        assert state["position"] == k * B * T  # what was consumed, not what was prefetched
    resumed = TokenLoader(shards, B, T, epochs=3, align_to_bos=align)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(take(resumed, 3), full[k:], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # load_state_dict on a loader that is already running rewinds it too
    loader.load_state_dict(state)
    assert torch.equal(next(loader)[0], full[k][0])


def test_resume_at_epoch_end_and_after_the_last_epoch(shards):
    B, T = 32, 1024
    n = TokenLoader(shards, B, T).batches_per_epoch
    loader = TokenLoader(shards, B, T, epochs=2)
    first = take(loader, n)  # exactly one pass
    state = roundtrip(loader.state_dict())
    resumed = TokenLoader(shards, B, T, epochs=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], first[0][0])  # the second pass starts over
    rest = list(loader)
    assert len(rest) == n
    done = TokenLoader(shards, B, T, epochs=2)
    done.load_state_dict(roundtrip(loader.state_dict()))
    assert list(done) == []


@pytest.mark.parametrize("align", [False, True])
def test_world_size_change_resumes_at_the_same_global_position(shards, align):
    B, T, k = 4, 512, 9
    two = [
        TokenLoader(shards, B, T, rank=r, world_size=2, epochs=1, align_to_bos=align)
        for r in range(2)
    ]
    steps = [take(loader, k + 2) for loader in two]
    # the reference: an uninterrupted 2-rank run; optimizer step k+1 = both ranks' batch k
    two_again = [
        TokenLoader(shards, B, T, rank=r, world_size=2, epochs=1, align_to_bos=align)
        for r in range(2)
    ]
    for loader in two_again:
        take(loader, k)
    states = [roundtrip(loader.state_dict()) for loader in two_again]
    assert states[0] == states[1]  # the state is global, not per rank
    # 2 ranks x B  ->  1 rank x 2 micro-steps of B
    one = TokenLoader(shards, B, T, epochs=1, align_to_bos=align)
    one.load_state_dict(states[0])
    for step in (k, k + 1):
        micro = take(one, 2)
        assert torch.equal(micro[0][0], steps[0][step][0])
        assert torch.equal(micro[1][0], steps[1][step][0])
        assert torch.equal(micro[1][1], steps[1][step][1])
    # and back: 1 rank at an optimizer-step boundary (2k micro-steps) -> 2 ranks
    back = [
        TokenLoader(shards, B, T, rank=r, world_size=2, epochs=1, align_to_bos=align)
        for r in range(2)
    ]
    one = TokenLoader(shards, B, T, epochs=1, align_to_bos=align)
    take(one, 2 * k)
    for r, loader in enumerate(back):
        loader.load_state_dict(roundtrip(one.state_dict()))
        assert torch.equal(next(loader)[0], steps[r][k][0])


@pytest.mark.parametrize("align", [False, True])
def test_a_change_of_row_length_continues_the_stream_on_every_rank(shards, stream, align):
    """A row-length schedule on two ranks: 4 batches of rows of 64, 3 of 128 (after the prefetch
    thread made batches ahead at 64), 2 of 32. Each global batch equals one rank's batch of
    2 x B rows at the same lengths, a state taken after the change resumes with the very next
    batch, and without alignment the rows tile the stream with no gap or repeat."""
    B, lengths = 2, [64] * 4 + [128] * 3 + [32] * 2

    def batches(loaders, state=None, start=0):
        if state is not None:
            for loader in loaders:
                loader.set_seq_len(lengths[start])
                loader.load_state_dict(state)
        out = []
        for T in lengths[start:]:
            time.sleep(0.01)  # let the prefetch threads run ahead of the consumer
            for loader in loaders:
                loader.set_seq_len(T)
                assert loader.tokens_per_batch == len(loaders) * loader.B * T  # the global batch
            out.append([next(loader) for loader in loaders])
        return out

    def loaders(W, b):
        return [
            TokenLoader(shards, b, 64, rank=r, world_size=W, epochs=1, align_to_bos=align)
            for r in range(W)
        ]

    two = batches(loaders(2, B))
    one = batches(loaders(1, 2 * B))
    for parts, [(x1, y1)] in zip(two, one, strict=True):
        assert torch.equal(torch.cat([x for x, _ in parts]), x1)
        assert torch.equal(torch.cat([y for _, y in parts]), y1)
    if not align:
        rows = torch.cat([x.reshape(-1) for parts in two for x, _ in parts])
        assert np.array_equal(rows.numpy(), stream[: len(rows)])
        assert len(rows) == 2 * B * sum(lengths)
    midway = loaders(2, B)  # through the change to 128, then a state and a resume
    for T in lengths[:5]:
        for loader in midway:
            loader.set_seq_len(T)
            next(loader)
    state = roundtrip(midway[0].state_dict())
    resumed = batches(loaders(2, B), state, start=5)
    for got, want in zip(resumed, two[5:], strict=True):
        for (x, y), (rx, ry) in zip(got, want, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_sources_as_folder_glob_and_arrays(shards, stream):
    B, T = 8, 64
    ref = take(TokenLoader(shards, B, T), 5)
    folder = TokenLoader(str(shards[0].parent), B, T)
    pattern = TokenLoader(str(shards[0].parent / "train_*.bin"), B, T)
    arrays = TokenLoader([stream[:1000], stream[1000:]], B, T, prefetch=False)
    for loader in (folder, pattern, arrays):
        for (x, y), (rx, ry) in zip(take(loader, 5), ref, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_state_dict_is_plain_data(shards):
    loader = TokenLoader(shards, 2, 64)
    take(loader, 3)
    state = loader.state_dict()

    def plain(v):
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return type(v) in (int, str)

    assert all(plain(v) for v in state.values())
    assert roundtrip(state) == state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(shards, stream):
    loader = TokenLoader(shards, 4, 256, device="cuda", epochs=1)
    x, y = next(loader)
    assert x.is_cuda and y.is_cuda
    rx, ry = next(reference_batches(stream, 1, 4, 256, 0))
    assert np.array_equal(x.cpu().numpy(), rx) and np.array_equal(y.cpu().numpy(), ry)


# ----------------------------------------------------------------------------- bad input


def test_empty_source_list():
    with pytest.raises(LoaderError, match="empty"):
        TokenLoader([], 4, 64)


def test_shard_shorter_than_one_batch_is_named(tmp_path):
    tiny = write_shard(tmp_path / "tiny.bin", np.arange(1000))
    with pytest.raises(LoaderError) as err:
        TokenLoader([tiny], 2, 256, world_size=2)
    msg = str(err.value)
    assert str(tiny) in msg and "shorter than one global batch of 1025" in msg and "\n" not in msg
    TokenLoader([tiny], 3, 333)  # 999 + 1 tokens fit exactly


@pytest.mark.parametrize("prefetch", [True, False])
def test_token_id_outside_vocabulary(tmp_path, shards, prefetch):
    good = np.array(open_shard(shards[0])[:5000])
    bad = good.copy()
    bad[4321] = 50300
    path = write_shard(tmp_path / "bad_ids.bin", bad)
    loader = TokenLoader([shards[0], path], 4, 1024, vocab_size=50257, prefetch=prefetch)
    take(loader, 10)  # ids are checked per shard when first read: the first shard is fine
    with pytest.raises(LoaderError) as err:
        take(TokenLoader([path], 4, 1024, vocab_size=50257, prefetch=prefetch), 1)
    assert f"{path}: token id 50300 at position 4321" in str(err.value)
    loader = TokenLoader([bad], 1, 128, vocab_size=50257, prefetch=prefetch)
    for _ in range(2):  # and again on the next call
        with pytest.raises(LoaderError, match=r"array\[0\]: token id 50300"):
            next(loader)
    take(TokenLoader([good], 1, 128, vocab_size=50257, prefetch=prefetch), 3)


def test_aligned_without_any_document_start(stream):
    no_bos = stream[stream != EOT][:10_000]
    for epochs in (1, None):
        loader = TokenLoader([no_bos], 2, 64, align_to_bos=True, epochs=epochs)
        with pytest.raises(LoaderError, match="no room for one BOS-aligned batch") as err:
            next(loader)
        assert "needs 2 rows of 65 tokens" in str(err.value)
        assert "10000 tokens hold 0 of them" in str(err.value)
    few = np.concatenate([[EOT], no_bos[:100], [EOT], no_bos[100:150]])  # one row fits, not two
    with pytest.raises(LoaderError, match="152 tokens hold 2 of them"):
        next(TokenLoader([few], 2, 64, align_to_bos=True))


def test_named_arrays_are_named_in_errors(stream):
    with pytest.raises(LoaderError, match=r"^my corpus \(training split\): 100 tokens, shorter"):
        TokenLoader([("my corpus (training split)", stream[:100])], 2, 64)
    bad = stream[:1000].astype(np.int64)
    bad[10] = 50300
    with pytest.raises(LoaderError, match=r"^the val text: token id 50300 at position 10"):
        next(TokenLoader([("the val text", bad)], 1, 64, vocab_size=50257, prefetch=False))


def test_bad_shard_in_sources(tmp_path, shards):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(shards[0].read_bytes()[:5000])  # header count no longer matches the size
    with pytest.raises(ShardError, match=str(bad)):
        TokenLoader([shards[0], bad], 4, 64)


def test_bad_arguments_and_states(shards):
    with pytest.raises(LoaderError, match="rank 2"):
        TokenLoader(shards, 4, 64, rank=2, world_size=2)
    with pytest.raises(LoaderError):
        TokenLoader([np.zeros((4, 4), dtype=np.int64)], 1, 2)
    loader = TokenLoader(shards, 4, 64)
    take(loader, 2)
    state = loader.state_dict()
    other = TokenLoader(shards[1:], 4, 64)  # different data: refuse to misplace the position
    with pytest.raises(LoaderError, match="different data"):
        other.load_state_dict(state)
    with pytest.raises(LoaderError, match="not a TokenLoader state"):
        loader.load_state_dict({"epoch": 0})
    more = TokenLoader([*shards, shards[0]], 4, 64)  # appending sources keeps the position valid
    more.load_state_dict(state)
    assert torch.equal(next(more)[0], next(loader)[0])
