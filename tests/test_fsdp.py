"""FSDP2 mode on CPU (gloo): the sharded optimizers against the single-process ones, and the
trainer under torchrun with ``training.parallel=fsdp`` against one process.

The optimizer checks run in spawned ranks (as in test_distributed.py): every rank builds the
same parameters, FSDP2 shards them, and each step's gradient is the mean of all ranks' seeded
gradients, given to the sharded optimizer as its row shards and to the reference whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from muongpt.optim import Muon
from muongpt.optim.fsdp import FSDPMuon
from test_distributed import (
    TINY,
    assert_same_training,
    assert_same_weights,
    checkpoint,
    make_params,
    mean_grads,
    metrics,
    spawn,
    train,
)

TOL = dict(rtol=0, atol=1e-5)
# 7 and 2 rows: uneven shards (2 rows on 3 ranks leaves rank 2 an empty one); counts of 5 and 4
# with a small block size: several blocks per shape, the last one padded with empty slots.
SHAPES = [(8, 6)] * 5 + [(6, 8)] * 4 + [(3, 2, 4), (7, 5), (2, 5)]


def sharded_params(shapes, mesh) -> list[nn.Parameter]:
    from torch.distributed.fsdp import fully_shard

    holder = nn.Module()
    for i, p in enumerate(make_params(shapes)):
        holder.register_parameter(f"p{i}", p)
    fully_shard(holder, mesh=mesh)
    return list(holder.parameters())


def set_grads(params, ref_params, world_size: int, step: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for p, q, g in zip(params, ref_params, mean_grads(SHAPES, world_size, step)):
        p.grad = distribute_tensor(g, p.device_mesh, [Shard(0)])
        q.grad = g.clone()


def check_fsdp_optimizers(rank: int, world_size: int, mesh) -> None:
    base = dict(lr=0.05, momentum=0.9, weight_decay=0.1, ns_coefficients="polar_express")
    normuon = dict(normuon=True, normuon_beta2=0.9, cautious_wd=True)
    groups = lambda ps: [
        {"params": ps[:6], "lr": 0.01, "weight_decay": 0.1},
        {"params": ps[6:], "lr": 0.02, "weight_decay": 0.0},
    ]
    cases = [
        (
            "muon",
            lambda ps: FSDPMuon(ps, ns_dtype=torch.float32, block_bytes=400, **base),
            lambda ps: Muon(ps, ns_dtype=torch.float32, **base),
        ),
        (
            "normuon",
            lambda ps: FSDPMuon(ps, ns_dtype=torch.float32, **base, **normuon),
            lambda ps: Muon(ps, ns_dtype=torch.float32, **base, **normuon),
        ),
        (
            "adamw",
            lambda ps: torch.optim.AdamW(groups(ps), betas=(0.8, 0.95), foreach=True),
            lambda ps: torch.optim.AdamW(groups(ps), betas=(0.8, 0.95)),
        ),
    ]
    for name, make, make_ref in cases:
        params, ref_params = sharded_params(SHAPES, mesh), make_params(SHAPES)
        opt, ref = make(params), make_ref(ref_params)
        for step in range(3):
            set_grads(params, ref_params, world_size, step)
            opt.step()
            ref.step()
            opt.zero_grad()
            ref.zero_grad()
            for i, (p, q) in enumerate(zip(params, ref_params)):
                torch.testing.assert_close(
                    p.full_tensor(), q.detach(), **TOL, msg=f"{name} param {i} step {step}"
                )
        # The state is sharded like the parameters: this rank holds about 1/W of the momentum.
        key = "momentum_buffer" if name != "adamw" else "exp_avg"
        held = sum(opt.state[p][key].to_local().numel() for p in params)
        assert held <= sum(p.numel() for p in ref_params) / world_size + 2 * 8 * 12
        for p, q in zip(params, ref_params):
            for k, value in ref.state[q].items():
                got = opt.state[p][k]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                torch.testing.assert_close(got, value, **TOL, msg=f"{name} state {k}")


def _fsdp_checks(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    pair = DeviceMesh("cpu", [0, 1])  # every rank takes part in creating it
    if rank < 2:
        check_fsdp_optimizers(rank, 2, pair)
    dist.barrier()
    check_fsdp_optimizers(rank, world_size, DeviceMesh("cpu", list(range(world_size))))


def test_fsdp_optimizers_match_single_process():
    """Muon, NorMuon and AdamW over FSDP2 shards, on ranks 0-1 and on all 3 ranks."""
    spawn(_fsdp_checks, 3)


# ---------------------------------------------------------------- the trainer under torchrun
# The speed-run model: document-masked attention, value embeddings, a 0-dim parameter FSDP
# cannot shard (kept whole, its gradient averaged by the optimizer).
SPEEDRUN = ["model=speedrun", "model.backout_after=2", "model.value_embeds=1"]


@pytest.mark.slow
def test_torchrun_fsdp_without_checkpoints_still_samples(tmp_path):
    """training.save_checkpoints=false under FSDP: nothing is written, and rank 0 still samples
    from a whole copy of the weights (gathered by every rank, as when the final checkpoint is
    saved), not from its shards alone."""
    run_dir = tmp_path / "fsdp"
    two = train(
        *TINY, *SPEEDRUN, "training.parallel=fsdp", "training.save_checkpoints=false",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, nproc=2,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("--- sample ---") == 1 and "checkpoint:" not in two.stdout
    assert not list(run_dir.glob("checkpoints/*"))


@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process_and_resumes_on_one(tmp_path):
    from muongpt.generate import load_model
    from muongpt.train.checkpoint import load_checkpoint

    fsdp_dir, one_dir, resumed_dir = tmp_path / "fsdp", tmp_path / "one", tmp_path / "resumed"
    two = train(
        *TINY,
        *SPEEDRUN,
        "training.parallel=fsdp",
        "training.export_safetensors=true",
        f"hydra.run.dir={fsdp_dir}",
        cwd=tmp_path,
        nproc=2,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "fully sharded (FSDP2)" in two.stdout and two.stdout.count("--- sample ---") == 1
    step4 = fsdp_dir / "checkpoints" / "step_000004.dcp"
    assert (step4 / ".metadata").is_file() and len(list(step4.glob("*.distcp"))) == 2
    one = train(*TINY, *SPEEDRUN, f"hydra.run.dir={one_dir}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = metrics(fsdp_dir), metrics(one_dir)
    assert sorted(a) == sorted(b) == list(range(9))
    assert abs(a[8]["val_loss"] - b[8]["val_loss"]) < 2e-3
    assert_same_training(a, b, range(9))
    # The sharded checkpoint read as the single-process one: the same weights and optimizer state.
    final_fsdp, final_one = (
        load_checkpoint(step4.with_name("step_000008.dcp")),
        checkpoint(one_dir, 8),
    )
    assert_same_weights(final_fsdp, final_one)
    for saved, want in zip(
        final_fsdp["optimizer"]["optimizers"], final_one["optimizer"]["optimizers"]
    ):
        assert saved["state"].keys() == want["state"].keys()
        for i, state in want["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(saved["state"][i][key], value, atol=1e-5, rtol=0)
    model, _ = load_model(fsdp_dir / "checkpoints" / "model.safetensors")  # the export
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final_one["model"][name], atol=1e-5, rtol=0)

    # Its step-4 checkpoint resumes on one process: the same last four steps.
    resumed = train(
        *TINY, *SPEEDRUN, f"training.resume={step4}", f"hydra.run.dir={resumed_dir}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_training(metrics(resumed_dir), b, range(5, 9))
    assert_same_weights(checkpoint(resumed_dir, 8), final_one)


@pytest.mark.slow
def test_torchrun_fsdp_trains_a_tied_embedding_and_head_as_one_process_does(tmp_path):
    """model.tie_embed_head untied at step 4 of 8 under FSDP2 on two ranks and on one process:
    the same losses and weights (the pair's row shards are folded, stepped and copied as the
    one-process pair is, and the untie rescales and seeds the table's shards)."""
    tied = [*SPEEDRUN, "model.tie_embed_head=true", "training.untie_embed_head_frac=0.5"]
    fsdp_dir, one_dir = tmp_path / "fsdp", tmp_path / "one"
    two = train(
        *TINY, *tied, "training.parallel=fsdp", f"hydra.run.dir={fsdp_dir}", cwd=tmp_path, nproc=2
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(*TINY, *tied, f"hydra.run.dir={one_dir}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_training(metrics(fsdp_dir), metrics(one_dir), range(9))
    from muongpt.train.checkpoint import load_checkpoint

    final = load_checkpoint(fsdp_dir / "checkpoints" / "step_000008.dcp")
    assert_same_weights(final, checkpoint(one_dir, 8))


def test_fsdp_unsupported_settings_are_one_line_errors():
    from omegaconf import OmegaConf

    from muongpt import MuonGPTError
    from muongpt.config import TrainingConfig
    from muongpt.optim import build_optimizer
    from muongpt.optim.fsdp import fsdp_optimizer
    from muongpt.train.fsdp import check_supported

    def settings(**kw):
        return OmegaConf.merge(OmegaConf.structured(TrainingConfig), {"parallel": "fsdp", **kw})

    check_supported(settings(), 2)  # supported: passes
    check_supported(settings(compile=True, compile_mode="blocks"), 2)
    cases = [
        (settings(parallel="zero3"), 2, "training.parallel must be one of"),
        (settings(), 1, "launch with torchrun --nproc_per_node>=2"),
        (settings(compile=True), 2, "use training.compile_mode=blocks"),
        (settings(compile_warmup_steps=2), 2, "compile_warmup_steps is not supported"),
    ]
    for t, world, message in cases:
        with pytest.raises(MuonGPTError, match=message) as e:
            check_supported(t, world)
        assert "\n" not in str(e.value)
    check_supported(settings(parallel="replicate"), 2, ["bf16_tables"])
    with pytest.raises(MuonGPTError, match="bf16_tables is not supported with training.paral") as e:
        check_supported(settings(), 2, ["flex_attention", "bf16_tables"])
    assert "\n" not in str(e.value)
    from test_distributed import tiny_gpt

    with pytest.raises(MuonGPTError, match="supports optimizer=muon and optimizer=adamw, not SOAP"):
        fsdp_optimizer(build_optimizer(tiny_gpt(), {"name": "soap"}))


def test_fsdp_adamw_runs_foreach_whatever_its_groups_were_built_with():
    """On CUDA the one-process AdamW is fused and every param group records fused=True, which
    AdamW's step reads per group: the FSDP form drops those records, so its groups run foreach
    (on the DTensors) and keep their own options (a head with its own betas and decay)."""
    from muongpt.optim import build_optimizer
    from muongpt.optim.fsdp import fsdp_optimizer
    from test_distributed import tiny_gpt

    overrides = {"head": {"betas": [0.5, 0.9], "weight_decay": 0.1}}
    combined = build_optimizer(tiny_gpt(), {"name": "muon", "adamw_overrides": overrides})
    adamw = combined.optimizers[1]
    for group in adamw.param_groups:  # as torch.optim.AdamW(..., fused=True) leaves them
        group.update(fused=True, foreach=None)
    converted = fsdp_optimizer(combined).optimizers[1]
    assert converted.defaults["fused"] is None and converted.defaults["foreach"] is True
    for group in converted.param_groups:
        assert not group["fused"] and group["foreach"] is True, group["name"]
    head = next(g for g in converted.param_groups if g["name"] == "head")
    assert head["betas"] == (0.5, 0.9) and head["weight_decay"] == 0.1
