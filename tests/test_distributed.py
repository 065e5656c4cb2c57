"""Distributed training on CPU (gloo): sharded optimizers against single-process references, and
the real trainer under torchrun against the same run on one process.

The optimizer checks run inside spawned ranks (``torch.multiprocessing``) and compare each rank's
result with the single-process optimizer stepped on the mean of all ranks' gradients; every rank
can compute that reference itself because the gradients come from per-rank seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muongpt.optim import SOAP, Muon, build_optimizer
from muongpt.optim.distributed import (
    Comm,
    DistributedMuon,
    ZeRO2AdamW,
    distribute,
    optimizer_state_bytes,
)
from muongpt.optim.distributed_soap import DistributedSOAP
from muongpt.train.schedule import muon_momentum
from test_resume import TIED_SPEEDRUN

TOL = dict(rtol=0, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int) -> None:
    mp.spawn(_worker, args=(fn, world_size, free_port()), nprocs=world_size, join=True)


# Long enough for a loaded machine: rank 2 waits in a world collective while ranks 0-1 run
# their pair checks, and a timeout there left async collectives in flight (see _worker).
COLLECTIVE_TIMEOUT_S = 600


def _worker(rank: int, fn, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    fn(rank, world_size)
    # Only after a clean run: no rank tears its connections down while another still has
    # collectives in flight (gloo aborts the process whose peer vanished mid-operation). After
    # a failure, async collectives may still run; destroying the group under them aborts
    # (SIGABRT, "terminate called without an active exception") before the error is reported,
    # so a failing rank leaves the group to process exit.
    dist.barrier()
    dist.destroy_process_group()
    # Every check has held: leave without the interpreter's teardown, where gloo's threads can
    # still abort the process (SIGABRT, "terminate called without an active exception"; seen
    # once in CI on a run whose ranks had no error to report), failing a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def single_process():
    """build_optimizer as if no process group existed: the single-process reference."""
    real = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        yield
    finally:
        dist.is_initialized = real


def rank_grads(shapes, rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in shapes]


def mean_grads(shapes, world_size: int, step: int) -> list[torch.Tensor]:
    per_rank = [rank_grads(shapes, r, step) for r in range(world_size)]
    return [torch.stack(gs).sum(0) / world_size for gs in zip(*per_rank)]


def make_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def assert_close_all(got, want, what: str, tol: dict = TOL) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------- the optimizer checks
NORMUON_CAUTIOUS = dict(normuon=True, normuon_beta2=0.9, cautious_wd=True)


def check_muon(rank: int, world_size: int, group=None) -> None:
    # 5 + 4 + 1 matrices: counts not divisible by 2 or 3, so the last blocks are padded; a tiny
    # bucket size forces several blocks per shape (block-cyclic ownership).
    shapes = [(8, 6)] * 5 + [(6, 8)] * 4 + [(3, 2, 4)]
    base = dict(lr=0.05, momentum=0.9, weight_decay=0.1, ns_coefficients="polar_express")
    variants = [(torch.float32, {}), (torch.bfloat16, {}), (torch.float32, NORMUON_CAUTIOUS)]
    for ns_dtype, extra in variants:
        hyper = {**base, **extra}
        params, ref_params = make_params(shapes), make_params(shapes)
        opt = DistributedMuon(params, Comm(group), bucket_bytes=400, ns_dtype=ns_dtype, **hyper)
        assert len(opt.blocks) > 3
        ref = Muon(ref_params, ns_dtype=ns_dtype, **hyper)
        for step in range(3):
            for p, g in zip(params, rank_grads(shapes, rank, step)):
                p.grad = g
            for p, g in zip(ref_params, mean_grads(shapes, world_size, step)):
                p.grad = g
            opt.step()
            ref.step()
            opt.zero_grad()
            assert_close_all(params, ref_params, f"muon {ns_dtype} step {step}")
        # State only on the owner: this rank holds about 1/W of it.
        assert optimizer_state_bytes(opt) < optimizer_state_bytes(ref) * (1 / world_size + 0.35)
        # The gathered state is Muon's own format and values, on every rank.
        state, ref_state = opt.state_dict(), ref.state_dict()
        assert state["state"].keys() == ref_state["state"].keys()
        for i, s in ref_state["state"].items():
            assert state["state"][i].keys() == s.keys()
            for key, value in s.items():
                torch.testing.assert_close(state["state"][i][key], value)
        # Restoring a single-process state (any N) continues exactly like the reference.
        fresh = DistributedMuon(
            make_params(shapes), Comm(group), bucket_bytes=400, ns_dtype=ns_dtype, **hyper
        )
        for p, q in zip(fresh.param_groups[0]["params"], ref_params):
            p.data.copy_(q)
        fresh.load_state_dict(ref.state_dict())
        for p, g in zip(fresh.param_groups[0]["params"], rank_grads(shapes, rank, 9)):
            p.grad = g
        for p, g in zip(ref_params, mean_grads(shapes, world_size, 9)):
            p.grad = g
        fresh.step()
        ref.step()
        assert_close_all(fresh.param_groups[0]["params"], ref_params, "muon after load")


def check_soap(rank: int, world_size: int, group=None) -> None:
    """DistributedSOAP against SOAP on the mean gradients (float64: the eigenbases are
    compared too), 7 steps with refreshes at 3 and 6; its state is SOAP's and resumes on any N."""
    # 5 + 4 + 1 tensors (padded last blocks, several blocks per shape); each side's first
    # statistic has at most a 1-dim null space, so the first eigenbasis is unique up to signs.
    shapes = [(6, 6)] * 5 + [(5, 6)] * 4 + [(3, 2, 4)]
    base = dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.05, precondition_frequency=3)
    for extra in ({"one_sided": False}, {"one_sided": True, "orthonormalize": "cholesky_qr"}):
        hyper = {**base, **extra}
        make = lambda: [p.detach().double().requires_grad_() for p in make_params(shapes)]  # noqa: E731
        mean64 = lambda step: [  # noqa: E731
            sum(gs) / world_size
            for gs in zip(
                *[[g.double() for g in rank_grads(shapes, r, step)] for r in range(world_size)]
            )
        ]
        params, ref_params = make(), make()
        opt = DistributedSOAP(params, Comm(group), bucket_bytes=1000, **hyper)
        assert len(opt.blocks) > 3
        ref = SOAP(ref_params, **hyper)
        for step in range(7):
            for p, g in zip(params, rank_grads(shapes, rank, step)):
                p.grad = g.double()
            for p, g in zip(ref_params, mean64(step)):
                p.grad = g
            opt.step()
            ref.step()
            opt.zero_grad()
            assert_close_all(
                params, ref_params, f"soap {extra} step {step}", dict(rtol=0, atol=1e-10)
            )
        assert optimizer_state_bytes(opt) < optimizer_state_bytes(ref) * (1 / world_size + 0.35)
        state, ref_state = opt.state_dict(), ref.state_dict()
        assert state["state"].keys() == ref_state["state"].keys()
        for i, s in ref_state["state"].items():
            assert state["state"][i]["step"] == s["step"] == 6
            for key in ("exp_avg", "exp_avg_sq", "GG", "Q"):
                want = s[key] if isinstance(s[key], list) else [s[key]]
                got = (
                    state["state"][i][key] if isinstance(s[key], list) else [state["state"][i][key]]
                )
                for a, b in zip(got, want):
                    assert (a is None) == (b is None)
                    if b is not None:
                        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        # The single-process state (from any N) loaded here continues like the reference.
        fresh = DistributedSOAP(make(), Comm(group), bucket_bytes=1000, **hyper)
        for p, q in zip(fresh.param_groups[0]["params"], ref_params):
            p.data.copy_(q)
        fresh.load_state_dict(ref.state_dict())
        for step in (7, 8, 9):  # a refresh at 9
            for p, g in zip(fresh.param_groups[0]["params"], rank_grads(shapes, rank, step)):
                p.grad = g.double()
            for p, g in zip(ref_params, mean64(step)):
                p.grad = g
            fresh.step()
            ref.step()
        assert_close_all(
            fresh.param_groups[0]["params"], ref_params, "soap after load", dict(rtol=0, atol=1e-10)
        )


def check_zero2_adamw(rank: int, world_size: int, group=None) -> None:
    # Rows 10, 7, 3, 5: none divisible by 3, most not by 2; two small tensors all-reduced.
    shapes = [(10, 7), (7,), (3, 4, 2), (5, 3), (2,), (1,)]
    groups = lambda ps: [
        {"params": ps[:3], "lr": 0.01, "weight_decay": 0.1},
        {"params": ps[3:], "lr": 0.02, "weight_decay": 0.0},
    ]
    hyper = dict(betas=(0.8, 0.95), eps=1e-10)
    params, ref_params = make_params(shapes), make_params(shapes)
    ref = torch.optim.AdamW(groups(ref_params), **hyper)
    opt = ZeRO2AdamW(groups(params), Comm(group), defaults=ref.defaults, min_shard_numel=5)
    assert len(opt.shards) == 4 and sum(len(b.params) for b in opt.replicated) == 2
    for step in range(3):
        for p, g in zip(params, rank_grads(shapes, rank, step)):
            p.grad = g
        for p, g in zip(ref_params, mean_grads(shapes, world_size, step)):
            p.grad = g
        opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 0.02 / (step + 1)  # a schedule
        opt.step()
        ref.step()
        opt.zero_grad()
        assert_close_all(params, ref_params, f"adamw step {step}")
    state, ref_state = opt.state_dict(), ref.state_dict()
    assert state["state"].keys() == ref_state["state"].keys()
    for i, s in ref_state["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state["state"][i][key], s[key].float(), **TOL)
    # Moments only for this rank's rows (the 2 small tensors are replicated).
    moment_elems = optimizer_state_bytes(opt) // 4
    rows = [(-(-s[0] // world_size)) * torch.Size(s[1:]).numel() for s in shapes[:4]]
    assert moment_elems == 2 * sum(rows) + 2 * (2 + 1) + 6  # + one step scalar per tensor
    # Load the single-process state, take a step: identical to the reference.
    fresh_params = [p.detach().clone().requires_grad_() for p in ref_params]
    fresh = ZeRO2AdamW(groups(fresh_params), Comm(group), defaults=ref.defaults, min_shard_numel=5)
    fresh.load_state_dict(ref.state_dict())
    for p, g in zip(fresh_params, rank_grads(shapes, rank, 7)):
        p.grad = g
    for p, g in zip(ref_params, mean_grads(shapes, world_size, 7)):
        p.grad = g
    fresh.step()
    ref.step()
    assert_close_all(fresh_params, ref_params, "adamw after load")


def tiny_gpt(seed: int = 0, **options):
    from muongpt.model.speedrun import SpeedrunConfig, SpeedrunGPT

    torch.manual_seed(seed)
    config = dict(vocab_size=200, n_layer=3, n_head=2, n_embd=32, value_embeds=1)
    config.update(bigram_rows=0, backout_after=1, window_pattern=[1.0], **options)
    model = SpeedrunGPT(SpeedrunConfig(**config))
    # Zero-initialised head and projections would leave the other gradients at rounding noise
    # for the first steps, where AdamW's sign-like first update magnifies the noise.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
        if model.tied_weights() is not None:  # a tied pair starts equal
            model.embed.weight.copy_(model.lm_head.weight)
    return model


def reference_step(model, opt, batches) -> torch.Tensor:
    """The single-process step on every rank's batch as one accumulation; returns the clip norm."""
    for x, y in batches:
        (model(x, y) / len(batches)).backward()
    norm = opt.clip_grad_norm_(0.5)
    opt.step()
    opt.zero_grad()
    return norm


def assert_same_on_every_rank(model, world_size: int) -> None:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], x) for x in everyone)


def check_hybrid_training(rank: int, world_size: int) -> None:
    """build_optimizer under a process group: overlapped reduction, clipping, save and restore."""
    for name in ("muon", "adamw", "soap"):
        model, ref_model = tiny_gpt(), tiny_gpt()
        cfg = {"name": name}
        if name == "adamw":
            cfg.update(lr=0.003)  # an AdamW-sized matrix lr (the dataclass defaults are Muon's)
        if name == "muon":  # a side group with its own betas and decay: the sharded AdamW's too
            cfg.update(adamw_overrides={"head": {"betas": [0.5, 0.9], "weight_decay": 0.1}})
        opt = distribute(build_optimizer(model, cfg), model)
        with single_process():
            ref = build_optimizer(ref_model, cfg)
        assert type(opt).__name__ == "DistributedCombinedOptimizer"
        sharded = {"muon": DistributedMuon, "adamw": ZeRO2AdamW, "soap": DistributedSOAP}[name]
        assert isinstance(opt.optimizers[0], sharded)
        for o in opt.optimizers + ref.optimizers:
            if isinstance(o, Muon):
                o.ns_dtype = torch.float32  # exact comparison; bf16 is checked in check_muon
        g = torch.Generator().manual_seed(5)
        # SOAP's eigenbases jump under last-bit changes of the gradient where eigenvalues nearly
        # coincide (as in this tiny model), and AdamW's second update flips sign for gradients
        # near zero: both are compared after their first update only. A wrongly scaled mean
        # gradient still shows in the clip norm, which is compared at every step.
        for step in range(1 if name in ("soap", "adamw") else 2):
            batches = [torch.randint(0, 200, (2, 2, 16), generator=g) for _ in range(world_size)]
            for lr_opt in (opt, ref):
                lr_opt.apply_schedule(1.0, muon_momentum(step, 0.85, 0.95, 300))
            # rank r: one micro-batch, its grads reduced during backward
            opt.reduce_during_next_backward()
            model(batches[rank][0], batches[rank][1]).backward()
            # every collective was launched by the backward hooks, none waits for step()
            assert opt.reducer.next == len(opt.reducer.buckets)
            if name == "muon":  # ZeRO-2: the local full-size gradients are already freed
                assert all(p.grad is None for p in opt.optimizers[0].param_groups[0]["params"])
            norm = opt.clip_grad_norm_(0.5)
            opt.step()
            opt.zero_grad()
            ref_norm = reference_step(ref_model, ref, batches)
            assert norm > 0.5 and ref_norm > 0.5  # it did clip
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
            # The mean gradient and the clip norm differ from the reference in the last bit
            # (other summation orders); SOAP's eigenbases and AdamW's near-zero moments magnify
            # that a little (the embedding lr is 2.9 here). A wiring error (a grad not averaged, or
            # averaged twice) is ~lr.
            assert_close_all(
                list(model.parameters()),
                list(ref_model.parameters()),
                f"{name} step {step}",
                dict(rtol=0, atol=5e-4),
            )
            assert_same_on_every_rank(model, world_size)
        # The checkpointed state is the single-process one: loads into either, on any N.
        state = opt.state_dict()
        assert state["kinds"] == ref.state_dict()["kinds"]
        with single_process():
            other = build_optimizer(tiny_gpt(), {"name": name})
        other.load_state_dict(state)
        opt.load_state_dict(ref.state_dict())


def check_tied_training(rank: int, world_size: int) -> None:
    """A tied embedding and head under the sharded optimizer (ZeRO2AdamW rows): while tied the
    pair moves as it does in one process (one weight stepped on the sum of both mean gradients,
    clipped by that sum's norm) and stays equal on every rank; at the untie the copy's AdamW
    starts from the master's moments on this rank's rows; apart, both still match."""
    # 600 tokens (640 padded rows x 32): sharded by rows, not divisible by 3 ranks
    model, ref_model = (tiny_gpt(vocab_size=600, tie_embed_head=True) for _ in range(2))
    opt = distribute(build_optimizer(model, {"name": "muon"}), model)
    with single_process():
        ref = build_optimizer(ref_model, {"name": "muon"})
    for o in opt.optimizers + ref.optimizers:
        if isinstance(o, Muon):
            o.ns_dtype = torch.float32
    adamw = opt.optimizers[1]
    order = [id(p) for group in adamw.param_groups for p in group["params"]]
    i_copy, i_master = (order.index(id(p)) for p in model.tied_weights())
    g = torch.Generator().manual_seed(7)
    # two steps, as check_hybrid_training: later AdamW updates magnify last-bit differences
    for step in range(2):
        if step == 1:  # the untie, before the first step apart
            before = adamw.state_dict()["state"]  # gathered from every rank's rows
            scale = model.untie_weights()
            opt.untie(scale)
            ref.untie(ref_model.untie_weights())
            after = adamw.state_dict()["state"]
            assert i_copy not in before and torch.equal(
                after[i_copy]["step"], before[i_master]["step"]
            )
            for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
                want = before[i_master][key] / scale**power
                torch.testing.assert_close(after[i_copy][key], want, rtol=1e-6, atol=0)
        batches = [torch.randint(0, 600, (2, 2, 16), generator=g) for _ in range(world_size)]
        for o in (opt, ref):
            o.apply_schedule(1.0, muon_momentum(step, 0.85, 0.95, 300))
        opt.reduce_during_next_backward()
        model(batches[rank][0], batches[rank][1]).backward()
        norm = opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
        ref_norm = reference_step(ref_model, ref, batches)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        # apart, the table's first step (lr 2.9 here) divides moments that cancel to near zero
        # for a few coordinates, which magnifies the last-bit differences; a wiring error is ~lr
        assert_close_all(
            list(model.parameters()),
            list(ref_model.parameters()),
            f"tied step {step}",
            dict(rtol=0, atol=5e-4 if step == 0 else 1e-2),
        )
        assert torch.equal(model.embed.weight, model.lm_head.weight) == (step < 1)
        assert_same_on_every_rank(model, world_size)
    # the checkpoint is the single-process one, the untied table's moments included
    state, ref_state = opt.state_dict(), ref.state_dict()
    with single_process():
        other = build_optimizer(tiny_gpt(vocab_size=600, tie_embed_head=True), {"name": "muon"})
    other.load_state_dict(state)
    assert state["kinds"] == ref_state["kinds"]


def test_sharded_optimizers_match_single_process():
    """3 ranks (parameter counts and rows not divisible by 3), and ranks 0-1 as a 2-rank group."""
    spawn(_all_checks, 3)


def _all_checks(rank: int, world_size: int) -> None:
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    if rank < 2:
        check_muon(rank, 2, pair)
        check_zero2_adamw(rank, 2, pair)
        check_soap(rank, 2, pair)
    check_muon(rank, world_size)
    check_soap(rank, world_size)
    check_zero2_adamw(rank, world_size)
    check_hybrid_training(rank, world_size)
    check_tied_training(rank, world_size)
    check_startup_agreement(rank, world_size)


def check_startup_agreement(rank: int, world_size: int) -> None:
    """A rank that fails to set up, or resolves another config, stops every rank (no hang)."""
    from muongpt.train.distributed import DistributedSetupError, agree_on_startup

    config = {"training": {"seed": 1, "batch_size": 8}}
    agree_on_startup(config, None)  # all well: returns on every rank
    mine = ValueError("data file missing on this node") if rank == 1 else None
    with pytest.raises(Exception) as failed:
        agree_on_startup(config, mine)
    if rank == 1:
        assert failed.value is mine
    else:
        assert isinstance(failed.value, DistributedSetupError)
        assert str(failed.value) == "rank 1 failed during setup: data file missing on this node"
    differs = {"training": {"seed": 1 + (rank == 2), "batch_size": 8}}
    with pytest.raises(DistributedSetupError, match=r"rank\(s\) \[2\].*training.seed"):
        agree_on_startup(differs, None)


# ---------------------------------------------------------------- the trainer under torchrun
TINY = [
    "optimizer=muon",  # DistributedMuon for the blocks, ZeRO2AdamW for embeddings and head
    "training.device=cpu",
    "training.max_steps=8",
    "training.seq_len=32",
    "training.micro_batch_size=2",
    "training.batch_size=4",
    "training.warmup_steps=0",
    "training.cooldown_steps=4",
    "training.log_every=1",
    "training.eval_every=4",
    "training.eval_tokens=512",
    "training.checkpoint_every=4",
    "training.keep_checkpoints=0",
    "training.export_safetensors=false",
    "training.sample_tokens=2",
    "training.progress_bar=false",
]


def train(*overrides: str, cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "muongpt.train"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "muongpt.train",
        ]
    return subprocess.run(
        [*launcher, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def checkpoint(run_dir: Path, step: int) -> dict:
    from muongpt.train.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}.pt")


def assert_same_training(a: dict, b: dict, steps) -> None:
    for step in steps:
        for key in ("train_loss", "val_loss"):
            if key in b[step]:
                assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step], b[step])


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=0, atol=1e-5, msg=name)


def on_two_ranks_and_one(tmp_path: Path, *overrides: str) -> dict[int, Path]:
    """The TINY run with ``overrides`` under torchrun on two ranks, then in one process: the
    run directory of each, by the number of ranks."""
    runs = {}
    for nproc in (2, 1):
        run_dir = tmp_path / f"ranks{nproc}"
        proc = train(*TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = run_dir
    return runs


@pytest.mark.slow
def test_torchrun_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    # Two ranks, no hydra.run.dir given: both must use the one directory rank 0 chose.
    two = train(*TINY, cwd=tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(run_dirs) == 1, run_dirs
    two_dir = run_dirs[0]
    assert (two_dir / ".hydra").is_dir() and (two_dir / "config.yaml").is_file()
    assert "x 2 ranks" in two.stdout and two.stdout.count("--- sample ---") == 1

    # One process, twice the accumulation: the same global batch of 4 sequences per step.
    one_dir = tmp_path / "one"
    one = train(*TINY, f"hydra.run.dir={one_dir}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "(2 micro-steps x 1 ranks)" in one.stdout
    a, b = metrics(two_dir), metrics(one_dir)
    assert sorted(a) == sorted(b) == list(range(9))
    assert_same_training(a, b, range(9))
    final_two, final_one = checkpoint(two_dir, 8), checkpoint(one_dir, 8)
    assert_same_weights(final_two, final_one)
    # The sharded optimizer state was gathered into the single-process format.
    for saved_two, saved_one in zip(
        final_two["optimizer"]["optimizers"], final_one["optimizer"]["optimizers"]
    ):
        assert saved_two["state"].keys() == saved_one["state"].keys()
        for i, state in saved_one["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(saved_two["state"][i][key], value, atol=1e-5, rtol=0)

    # Resume the one-process run's step-4 checkpoint on two ranks: the same last four steps.
    resumed_dir = tmp_path / "resumed"
    resumed = train(
        *TINY,
        f"training.resume={one_dir / 'checkpoints' / 'step_000004.pt'}",
        f"hydra.run.dir={resumed_dir}",
        cwd=tmp_path,
        nproc=2,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_training(metrics(resumed_dir), b, range(5, 9))
    assert_same_weights(checkpoint(resumed_dir, 8), final_one)


@pytest.mark.slow
def test_torchrun_trains_a_tied_embedding_and_head_as_one_process_does(tmp_path):
    """model.tie_embed_head untied at step 4 of 8, on two ranks and on one: the same losses and
    weights (the sharded AdamW folds the table's rows into the head's while tied); with rows of
    16 tokens for steps 0-3 and 32 after (``training.seq_len_schedule``) on both."""
    runs = on_two_ranks_and_one(tmp_path, *TIED_SPEEDRUN, "training.seq_len_schedule=[16,32]")
    assert_same_training(metrics(runs[2]), metrics(runs[1]), range(9))
    assert_same_weights(checkpoint(runs[2], 8), checkpoint(runs[1], 8))
    assert [metrics(runs[2])[s]["tokens"] for s in (4, 8)] == [4 * 4 * 16, 4 * 4 * (16 + 32)]
    weights = checkpoint(runs[2], 4)["model"]  # still tied at the step-4 checkpoint
    assert torch.equal(weights["embed.weight"], weights["lm_head.weight"])


@pytest.mark.slow
def test_torchrun_trains_bf16_tables_as_one_process_does(tmp_path):
    """``kernels.converters=[bf16_tables]`` (on in speedrun_bench) on two ranks and on one: the
    bf16 tables' gradients are summed over ranks in bf16 and their sharded AdamW state is bf16,
    yet losses and weights match the one-process run (two micro-steps) as the fp32 run's do,
    and the gathered checkpoint holds bf16 tables and moments."""
    runs = on_two_ranks_and_one(
        tmp_path,
        "model=speedrun",
        "model.value_embeds=1",
        "model.bigram_rows=64",
        "model.backout_after=1",
        "model.tie_embed_head=true",
        "kernels.converters=[bf16_tables]",
    )
    assert_same_training(metrics(runs[2]), metrics(runs[1]), range(9))
    final_two, final_one = checkpoint(runs[2], 8), checkpoint(runs[1], 8)
    assert_same_weights(final_two, final_one)  # dtypes too
    tables = ("value_embeds.0.weight", "bigram_embed.weight")
    assert all(final_two["model"][name].dtype == torch.bfloat16 for name in tables)
    moments = [
        v
        for opt in final_two["optimizer"]["optimizers"]
        for state in opt["state"].values()
        for k, v in state.items()
        if k == "exp_avg"
    ]
    assert any(m.dtype == torch.bfloat16 for m in moments)


@pytest.mark.slow
def test_torchrun_bad_batch_stops_every_rank_with_one_message(tmp_path):
    proc = train(
        *TINY, "training.batch_size=3", "training.micro_batch_size=1", cwd=tmp_path, nproc=2
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: training.batch_size (3) must be a multiple of micro_batch_size x world size "
        "(1 x 2 = 2)"
    ], proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "tiny").exists() or all(
        not (d / "checkpoints").exists() for d in (tmp_path / "runs" / "tiny").iterdir()
    )


def test_nccl_missing_or_too_few_gpus_is_a_clear_error(monkeypatch):
    from muongpt.train import distributed
    from muongpt.train.distributed import DistributedSetupError, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    with pytest.raises(DistributedSetupError, match="NCCL is not available"):
        init_distributed("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Exception, match="LOCAL_RANK 1 needs GPU 1 but only 1 are visible"):
        init_distributed("cuda")
    assert not distributed.dist.is_initialized()
