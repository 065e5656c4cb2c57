"""Runs that survive: kill -9 and resume, a truncated newest checkpoint, SIGTERM, NaN losses.

The end-to-end tests run the real `python -m muongpt.train` in a subprocess and compare against
one uninterrupted run: every logged loss and lr, and the final weights and optimizer state, must
be bit-identical (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from muongpt import MuonGPTError
from muongpt.train import checkpoint as ckpt
from muongpt.train import resilience
from muongpt.train.resilience import EXIT_INTERRUPTED, ConfigMismatchError, NonFiniteLossError

pytestmark = pytest.mark.slow

MAX_STEPS = 12
RUN = [
    "model/size=tiny",  # narrowed further: the 50K-token embedding and head dominate the cost
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "training.device=cpu",
    f"training.max_steps={MAX_STEPS}",
    "training.seq_len=32",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.warmup_steps=2",
    "training.cooldown_steps=4",
    "training.log_every=1",
    "training.eval_every=6",
    "training.eval_tokens=256",
    "training.checkpoint_every=2",
    "training.keep_checkpoints=3",
    "training.sample_tokens=4",
    "training.progress_bar=false",
]


# Draws from every RNG a run may use, each step: nothing in this CPU run draws random numbers
# itself, so without these a resume that forgot to restore the RNG states would still match.
# KILL_AT_STEP=K: the run SIGKILLs itself as step K begins (a kill at an exact moment).
DRAW_EVERY_STEP = """
import os, random, signal
import numpy as np, torch
from muongpt.train import trainer as tr
_step = tr.Trainer.train_step
def train_step(self):
    if os.environ.get("KILL_AT_STEP") == str(self.step + 1):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.rand(1); np.random.rand(); random.random()
    return _step(self)
tr.Trainer.train_step = train_step
from muongpt.train.__main__ import main
main()
"""


def start(run_dir: Path, *extra: str, kill_at_step: int = 0) -> subprocess.Popen:
    # One thread each: two runs can share the 2 cores, and every run computes the same way.
    return subprocess.Popen(
        [sys.executable, "-c", DRAW_EVERY_STEP, *RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": str(kill_at_step)},
    )


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = start(run_dir, *extra)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def records(run_dir: Path) -> list[dict]:
    """The records so far, for polling a live run (a line being written right now is skipped)."""
    out = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def whole_records(run_dir: Path) -> list[dict]:
    """Every line of a finished run's metrics.jsonl: each must be whole, strict JSON."""

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant} (not strict JSON)")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step and "train_loss" in r for r in records(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} in metrics.jsonl after {timeout} s")
        time.sleep(0.02)


def comparable(run_dir: Path) -> list[tuple]:
    """What must not change across an interruption (timings may)."""
    return [
        (r["step"], r["tokens"], r["lr"], r.get("train_loss"), r.get("val_loss"))
        for r in whole_records(run_dir)
    ]


def assert_same_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_final_state(run_dir: Path, reference: Path) -> None:
    final = f"checkpoints/step_{MAX_STEPS:06d}.pt"
    got, want = ckpt.load_checkpoint(run_dir / final), ckpt.load_checkpoint(reference / final)
    assert got["model"].keys() == want["model"].keys()
    for name in want["model"]:
        assert torch.equal(got["model"][name], want["model"][name]), name
    assert_same_tree(got["optimizer"], want["optimizer"], "optimizer")
    assert got["loader"] == want["loader"] and got["tokens_seen"] == want["tokens_seen"]
    assert_same_tree(got["rng"], want["rng"], "rng")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, started in the background; call the fixture to wait for it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = start(run_dir)

    def finished() -> Path:
        if proc.returncode is None:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
        steps = [r["step"] for r in records(run_dir) if "train_loss" in r]
        assert steps == list(range(1, MAX_STEPS + 1))
        return run_dir

    yield finished
    if proc.poll() is None:
        proc.kill()


@pytest.mark.parametrize("first", [False, True], ids=["random-step", "before-first-checkpoint"])
def test_kill9_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, first):
    # Checkpoints come at steps 2, 4, ...: "first" dies as step 2 begins, after step 1's record.
    run_dir = tmp_path / "run"
    proc = start(run_dir, kill_at_step=2 if first else 0)
    if not first:
        wait_for_step(proc, run_dir, random.randint(3, MAX_STEPS - 3))
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in records(run_dir))
    assert killed_at < MAX_STEPS, "the run finished before the kill; nothing was tested"
    assert bool(ckpt.list_checkpoints(run_dir)) != first, f"kill at step {killed_at}"

    resumed = train(run_dir, "training.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = "training.resume=auto: no checkpoint" if first else "resumed from"
    assert expected in resumed.stdout, f"kill at step {killed_at}"
    assert comparable(run_dir) == comparable(reference()), f"kill at step {killed_at}"
    steps = [r["step"] for r in whole_records(run_dir)]
    assert len(steps) == len(set(steps)), steps  # each step exactly once
    assert_same_final_state(run_dir, reference())


def test_sigterm_saves_a_checkpoint_that_resumes_bit_identically(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "received SIGTERM" in err
    line = next(ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM"))
    step = int(line.split("after step ")[1].split(":")[0])
    assert 3 <= step < MAX_STEPS
    path = ckpt.checkpoint_path(run_dir, step)
    assert str(path) in line and "training.resume=auto" in line
    assert ckpt.load_resumable(path)["step"] == step
    assert "--- sample ---" not in out  # it stopped; it did not finish the run

    resumed = train(run_dir, "training.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {path}: step {step}" in resumed.stdout
    assert comparable(run_dir) == comparable(reference())
    assert_same_final_state(run_dir, reference())


# ---------------------------------------------------------------- in-process: the Trainer API
def compose(tmp_path: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*RUN, *overrides])


def make_trainer(tmp_path: Path, *overrides: str):
    from muongpt.train.trainer import Trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)  # Hydra makes it for the CLI
    return Trainer(compose(tmp_path, *overrides), run_dir)


def poison(trainer, bad_steps: set[int]) -> None:
    """Make the loss of the given steps NaN (the forward pass is the Trainer's injection point)."""
    forward = trainer.forward

    def poisoned(inputs, targets):
        loss = forward(inputs, targets)
        return loss * float("nan") if trainer.step + 1 in bad_steps else loss

    trainer.forward = poisoned


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    previous = trainer.save_checkpoint()
    trainer.train_step()
    newest = trainer.save_checkpoint()
    trainer.train_step()
    after_3_steps = copy.deepcopy(trainer.model.state_dict())
    trainer.close()
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = make_trainer(tmp_path, "training.resume=auto")
    err = capsys.readouterr().err
    assert f"warning: skipping {newest}: unreadable or truncated checkpoint" in err
    assert resumed.resumed_from == previous and resumed.step == 1
    assert not newest.exists() and newest.with_name(newest.name + ".unreadable").exists()
    resumed.train_step()
    resumed.train_step()  # the two steps again, from the step-1 state: the same weights
    assert_same_tree(resumed.model.state_dict(), after_3_steps, "model")
    resumed.close()


def test_nan_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    # Log steps and evaluations come only at step 12: the save of step 6 is the first check
    # after the NaN of step 4; it must refuse, and the error still names step 4.
    trainer = make_trainer(
        tmp_path, "training.log_every=12", "training.eval_every=12", "training.checkpoint_every=3"
    )
    poison(trainer, {4})
    try:
        with pytest.raises(NonFiniteLossError) as info:
            trainer.run()
    finally:
        trainer.close()
    good = ckpt.checkpoint_path(trainer.run_dir, 3)
    message = str(info.value)
    assert "non-finite training loss at step 4 (noticed at step 6)" in message
    assert f"last good checkpoint: {good}" in message and "\n" not in message
    assert ckpt.list_checkpoints(trainer.run_dir) == [good]  # nothing saved after the NaN
    state = ckpt.load_resumable(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(r["step"] < 4 for r in records(trainer.run_dir))


def optimizer_buffers(trainer) -> list:
    return [o["state"] for o in trainer.optimizer.state_dict()["optimizers"]]


def test_skip_bad_steps_drops_the_update_then_stops_past_the_budget(tmp_path):
    trainer = make_trainer(tmp_path, "training.max_bad_steps=1")
    poison(trainer, {3, 5})
    trainer.train_step()
    trainer.train_step()
    weights = copy.deepcopy(trainer.model.state_dict())
    optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    loss = trainer.train_step()  # step 3: NaN, skipped
    assert math.isnan(float(loss)) and trainer.step == 3 and trainer.guard.bad_steps == 1
    assert_same_tree(trainer.model.state_dict(), weights, "model")
    # Moments and momentum buffers untouched; the schedule still moved lr / momentum on.
    assert_same_tree(optimizer_buffers(trainer), [o["state"] for o in optimizer["optimizers"]])
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.train_step()  # step 4: a normal update
    assert not torch.equal(trainer.model.lm_head.weight, weights["lm_head.weight"])
    assert trainer.guard.first_bad_step() is None  # skipped steps are not errors
    with pytest.raises(NonFiniteLossError, match="at step 5, more than training.max_bad_steps=1"):
        trainer.train_step()
    trainer.close()


def test_resume_between_two_embedding_steps_is_bit_identical(tmp_path):
    """With ``optimizer.embed_head_every=3`` a checkpoint after step 4 holds step 4's embedding
    and head gradients: a resume from it trains on exactly as the uninterrupted run."""
    every = "optimizer.embed_head_every=3"
    (tmp_path / "a").mkdir()
    whole = make_trainer(tmp_path / "a", every)
    for _ in range(4):
        whole.train_step()
    whole.save_checkpoint()
    assert whole.model.embed.weight.grad is not None  # held for step 6
    for _ in range(4):
        whole.train_step()
    (tmp_path / "b").mkdir()
    path = ckpt.checkpoint_path(tmp_path / "a" / "run", 4)
    resumed = make_trainer(tmp_path / "b", every, f"training.resume={path}")
    assert resumed.step == 4
    for _ in range(4):
        resumed.train_step()
    assert_same_tree(resumed.model.state_dict(), whole.model.state_dict(), "model")
    whole.close(), resumed.close()


# a small speed-run model whose embedding and head are tied for the first half of the run
TIED_SPEEDRUN = [
    "model=speedrun",
    "model.value_embeds=1",
    "model.bigram_rows=0",
    "model.backout_after=1",
    "model.tie_embed_head=true",
    "training.untie_embed_head_frac=0.5",
]


def test_resume_at_the_untie_of_embedding_and_head_is_bit_identical(tmp_path):
    """model.tie_embed_head untied at step 6 of 12: a run resumed from the step-6 checkpoint
    (still tied) unties and trains on exactly as the uninterrupted run."""
    tie = TIED_SPEEDRUN
    (tmp_path / "a").mkdir()
    whole = make_trainer(tmp_path / "a", *tie)
    assert whole.schedule.untie_step == 6
    for _ in range(6):
        whole.train_step()
    assert torch.equal(whole.model.embed.weight, whole.model.lm_head.weight)
    whole.save_checkpoint()
    for _ in range(3):
        whole.train_step()
    assert not torch.equal(whole.model.embed.weight, whole.model.lm_head.weight)
    (tmp_path / "b").mkdir()
    path = ckpt.checkpoint_path(tmp_path / "a" / "run", 6)
    resumed = make_trainer(tmp_path / "b", *tie, f"training.resume={path}")
    for _ in range(3):
        resumed.train_step()
    assert_same_tree(resumed.model.state_dict(), whole.model.state_dict(), "model")
    whole.close(), resumed.close()
    (tmp_path / "c").mkdir()
    with pytest.raises(MuonGPTError, match=r"untie_embed_head_frac must be in \(0, 1\], got 0"):
        make_trainer(tmp_path / "c", *tie[:-1], "training.untie_embed_head_frac=0")


def test_resume_with_bf16_tables_is_bit_identical(tmp_path):
    """``kernels.converters=[bf16_tables]``: the checkpoint holds the bf16 tables and their bf16
    AdamW state, and a run resumed from it trains on exactly as the uninterrupted run."""
    bf16 = [
        *TIED_SPEEDRUN[:2],
        "model.bigram_rows=97",
        TIED_SPEEDRUN[3],
        "kernels.converters=[bf16_tables]",
    ]
    (tmp_path / "a").mkdir()
    whole = make_trainer(tmp_path / "a", *bf16)
    assert whole.model.bigram_embed.weight.dtype == torch.bfloat16
    for _ in range(3):
        whole.train_step()
    whole.save_checkpoint()
    for _ in range(3):
        whole.train_step()
    (tmp_path / "b").mkdir()
    path = ckpt.checkpoint_path(tmp_path / "a" / "run", 3)
    resumed = make_trainer(tmp_path / "b", *bf16, f"training.resume={path}")
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    assert resumed.model.value_embeds[0].weight.dtype == torch.bfloat16
    assert_same_tree(resumed.model.state_dict(), whole.model.state_dict(), "model")
    whole.close()
    resumed.close()


def test_resume_refuses_a_checkpoint_of_another_model_shape(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.save_checkpoint()
    trainer.close()
    with pytest.raises(ConfigMismatchError) as info:
        make_trainer(tmp_path, "training.resume=auto", "model.n_layer=3", "model.n_embd=64")
    message = str(info.value)
    assert "model.n_layer (checkpoint 2, requested 3)" in message
    assert "model.n_embd (checkpoint 32, requested 64)" in message


def test_a_checkpoint_whose_state_does_not_fit_the_model_is_one_line(tmp_path):
    """Same config, but a weight of another shape in the file (edited, or written by other
    code): the resume stops with one line naming the file and the loader's first line."""
    trainer = make_trainer(tmp_path)
    path = trainer.save_checkpoint()
    trainer.close()
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 5)
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        make_trainer(tmp_path, "training.resume=auto")
    message = str(info.value)
    assert message.startswith(f"{path}: cannot resume from it (RuntimeError: ")
    assert "\n" not in message and len(message) < len(str(path)) + 220


def test_second_signal_exits_at_once(monkeypatch):
    exits = []

    def fake_exit(code):
        exits.append(code)

    monkeypatch.setattr(resilience.os, "_exit", fake_exit)
    handler = resilience.PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert handler.signum == signal.SIGTERM and exits == []
        assert handler.should_stop(resilience.DistContext(), step=1, every=10)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert exits == [128 + signal.SIGINT]
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGTERM) is not handler._handle


def test_window_schedule_grows_the_flex_window_during_training(tmp_path):
    """The speed-run model trains on CPU (dense document masks), the window
    follows the schedule step by step, and evaluation runs with the current window."""
    from muongpt.train.schedule import attention_window

    flex = [
        "model=speedrun",
        "model.value_embeds=1",
        "model.bigram_rows=64",
        "model.backout_after=1",
        "model.window_pattern=[1.0]",
        "model.attn_window=24",
        "training.attn_window_start=4",
    ]
    trainer = make_trainer(tmp_path, *flex)
    seen = []
    for _ in range(4):
        trainer.train_step()
        seen.append(int(trainer.model.current_window))
    expected = [attention_window(s, MAX_STEPS, 4, 24) for s in range(4)]
    assert seen == expected and seen[0] < seen[-1]
    assert torch.isfinite(torch.tensor(trainer.evaluate()))


def test_per_block_compilation_trains_like_eager(tmp_path):
    """training.compile_mode=blocks compiles each block and the head on their own; the losses
    of the first steps match the uncompiled run."""
    losses = {}
    for mode in ("eager", "blocks"):
        compiled = ["training.compile=true", "training.compile_mode=blocks"]
        (tmp_path / mode).mkdir()
        trainer = make_trainer(tmp_path / mode, *(compiled if mode == "blocks" else []))
        losses[mode] = [float(trainer.train_step()) for _ in range(3)]
        if mode == "blocks":
            assert all(hasattr(b, "_compiled_call_impl") for b in trainer.model.blocks)
            assert hasattr(trainer.model.lm_head, "_compiled_call_impl")
        trainer.close()
    torch.testing.assert_close(losses["blocks"], losses["eager"], atol=1e-4, rtol=1e-4)


def test_unknown_compile_mode_is_named(tmp_path):
    with pytest.raises(MuonGPTError, match="compile_mode"):
        make_trainer(tmp_path, "training.compile=true", "training.compile_mode=graph")


def test_inductor_options_are_checked_by_name(tmp_path):
    """training.inductor passes torch._inductor options to torch.compile; a misspelled one is
    named before anything compiles, a real one is accepted."""
    with pytest.raises(MuonGPTError, match="coordinate_descent_tunning"):
        make_trainer(
            tmp_path, "training.compile=true", "+training.inductor.coordinate_descent_tunning=true"
        )
    trainer = make_trainer(
        tmp_path, "training.compile=true", "+training.inductor.coordinate_descent_tuning=true"
    )
    trainer.close()


def test_nested_inductor_options_are_joined_with_dots():
    """Hydra nests a dotted torch option (triton.cudagraphs); it reaches torch under its name,
    and a misspelled nested one is named in full."""
    from omegaconf import OmegaConf

    from muongpt.train.trainer import inductor_options

    nested = OmegaConf.create({"triton": {"cudagraphs": True}, "max_autotune": False})
    assert inductor_options(nested) == {"triton.cudagraphs": True, "max_autotune": False}
    with pytest.raises(MuonGPTError, match="triton.cudagrahps"):
        inductor_options({"triton": {"cudagrahps": True}})


def test_batch_ramp_trains_small_batches_first_and_counts_their_tokens(tmp_path):
    """training.batch_size_start: the first steps take fewer micro-batches (each a full
    micro-batch of fresh data), and tokens_seen counts what was actually trained on."""
    from muongpt.train.schedule import batch_rows

    ramp = [
        "training.micro_batch_size=1",
        "training.batch_size_start=1",
        "training.batch_ramp_steps=3",
    ]
    trainer = make_trainer(tmp_path, *ramp)
    rows = []
    for _ in range(4):
        before = trainer.tokens_seen
        trainer.train_step()
        rows.append((trainer.tokens_seen - before) // 32)
    assert rows == [batch_rows(s, 1, 4, 3) for s in range(4)] == [1, 2, 3, 4]
    with pytest.raises(MuonGPTError, match="batch_size_start"):
        make_trainer(tmp_path, "training.micro_batch_size=2", "training.batch_size_start=3",
                     "training.batch_ramp_steps=3")  # fmt: skip
    with pytest.raises(MuonGPTError, match="batch_ramp_steps"):
        make_trainer(tmp_path, "training.micro_batch_size=1", "training.batch_size_start=1")


def test_row_length_schedule_reads_the_stream_once_resumes_exactly_and_warms_up_each_length(
    tmp_path,
):
    """training.seq_len_schedule=[16, 32]: steps 0-5 train on rows of 16 tokens, steps 6-11 on
    rows of 32; together they read the training stream from its start without a gap or a repeat
    (the batches made ahead at 16 are dropped at the switch), tokens_seen counts them, a resume
    inside the first part trains on exactly as the uninterrupted run, and the compile warm-up
    runs one step at each length and then undoes all of it."""
    from muongpt.train.schedule import row_length
    from muongpt.train.trainer import compile_warmup

    # n lengths over S steps: step s in slice floor(s n / S); none: seq_len throughout
    assert [row_length(s, 10, [1, 2, 3], 9) for s in range(10)] == [1] * 4 + [2] * 3 + [3] * 3
    assert row_length(5, 10, [], 9) == 9
    rows = "training.seq_len_schedule=[16,32]"

    def recording(trainer):
        seen, forward = [], trainer.forward

        def record(inputs, targets):
            seen.append(inputs.clone())
            return forward(inputs, targets)

        trainer.forward = record
        return seen

    (tmp_path / "a").mkdir()
    whole = make_trainer(tmp_path / "a", rows)
    fed = recording(whole)
    tokens = []
    for step in range(MAX_STEPS):
        if step == 4:
            whole.save_checkpoint()
        whole.train_step()
        tokens.append(whole.last_step_tokens)
    assert [x.shape[1] for x in fed] == [16] * 6 + [32] * 6
    assert tokens == [64] * 6 + [128] * 6 and whole.tokens_seen == sum(tokens)
    stream = torch.empty(sum(tokens), dtype=torch.int64)
    whole.train_loader.stream.read_into(0, stream.numpy())
    assert torch.equal(torch.cat([x.reshape(-1) for x in fed]), stream)

    (tmp_path / "b").mkdir()
    path = ckpt.checkpoint_path(tmp_path / "a" / "run", 4)
    resumed = make_trainer(tmp_path / "b", rows, f"training.resume={path}")
    for _ in range(MAX_STEPS - 4):
        resumed.train_step()
    assert_same_tree(resumed.model.state_dict(), whole.model.state_dict(), "model")
    assert resumed.tokens_seen == whole.tokens_seen

    (tmp_path / "c").mkdir()
    warmed = make_trainer(tmp_path / "c", rows)
    warm = recording(warmed)
    compile_warmup(warmed, 1)
    assert [x.shape[1] for x in warm] == [16, 32] and warmed.step == 0
    for _ in range(MAX_STEPS):
        warmed.train_step()
    assert_same_tree(warmed.model.state_dict(), whole.model.state_dict(), "model")
    assert torch.equal(torch.cat([x.reshape(-1) for x in warm[2:]]), stream)
    whole.close(), resumed.close(), warmed.close()
    with pytest.raises(MuonGPTError, match=r"seq_len_schedule must list row lengths >= 1"):
        make_trainer(tmp_path / "c", "training.seq_len_schedule=[16,0]")
    too_many = f"training.seq_len_schedule=[{','.join(['16'] * (MAX_STEPS + 1))}]"
    (tmp_path / "d").mkdir(), (tmp_path / "e").mkdir()
    with pytest.raises(MuonGPTError, match=r"lists 13 row lengths, more than training.max_steps"):
        make_trainer(tmp_path / "d", too_many)
    make_trainer(tmp_path / "e", too_many.replace("16,", "", 1)).close()  # one step each: fine


def test_lr_follows_each_steps_tokens_to_a_power(tmp_path):
    """training.lr_token_power=p: every lr times (this step's tokens / a full step's)^p, where a
    batch ramp (2 then 4 rows) and a row schedule (16 then 32 tokens) make steps smaller."""
    from muongpt.train.schedule import Schedule

    smaller = [
        "training.micro_batch_size=2",
        "training.batch_size_start=2",
        "training.batch_ramp_steps=2",
        "training.seq_len_schedule=[16,32]",
    ]
    plain, scaled = (
        compose(tmp_path, *smaller),
        compose(tmp_path, *smaller, "training.lr_token_power=0.5"),
    )
    base = Schedule(plain.training, plain.optimizer, unit=2)
    schedule = Schedule(scaled.training, scaled.optimizer, unit=2)
    ratios = [schedule.at(s).lr_scale / base.at(s).lr_scale for s in range(MAX_STEPS)]
    # steps 0-1: 2 of 4 rows, of 16 of 32 tokens; steps 2-5: 4 rows of 16; then full steps
    expected = [0.25**0.5] * 2 + [0.5**0.5] * 4 + [1.0] * 6
    assert ratios == pytest.approx(expected, rel=1e-12)


def test_muon_momentum_cools_down_over_the_last_steps(tmp_path):
    """optimizer.momentum_cooldown_steps=4: the trainer gives Muon momentum 0.95 until the last
    four steps, then 0.925, 0.90, 0.875 (towards momentum_start at the end); AdamW is untouched.
    More steps than the run is a one-line error."""
    trainer = make_trainer(
        tmp_path, "optimizer.momentum_warmup_steps=0", "optimizer.momentum_cooldown_steps=4"
    )
    used = []
    for _ in range(MAX_STEPS):
        trainer.train_step()
        used.append({g["momentum"] for g in trainer.optimizer.param_groups if "momentum" in g})
    trainer.close()
    assert [m.pop() for m in used if len(m) == 1] == pytest.approx(
        [0.95] * (MAX_STEPS - 3) + [0.925, 0.90, 0.875]
    )
    (tmp_path / "long").mkdir()
    with pytest.raises(MuonGPTError, match=r"momentum_cooldown_steps must be in \[0, training"):
        make_trainer(tmp_path / "long", f"optimizer.momentum_cooldown_steps={MAX_STEPS + 1}")


@pytest.mark.parametrize("lengths", ["[16,24,48]", "[16]"])
def test_each_row_length_compiles_its_own_static_graph_in_the_warm_up(tmp_path, lengths):
    """Training rows of other lengths than evaluation's (seq_len 32) compile one static graph
    per length, none of symbolic length (dynamo's automatic dynamic shapes would trace one at
    the first change of shape, the evaluation's included), and all the training graphs in the
    warm-up: the training steps after it and after an evaluation compile nothing."""
    import logging

    import torch._dynamo
    from torch._dynamo.utils import counters

    from muongpt.train.trainer import compile_warmup

    symbols = []

    class Symbols(logging.Handler):
        def emit(self, record):
            if "create_symbol" in record.getMessage():
                symbols.append(record.getMessage())

    shapes_log, handler = logging.getLogger("torch.fx.experimental.symbolic_shapes"), Symbols()
    torch._dynamo.reset()
    counters.clear()
    torch._logging.set_logs(dynamic=logging.INFO)
    shapes_log.addHandler(handler)
    try:
        trainer = make_trainer(
            tmp_path, "training.compile=true", f"training.seq_len_schedule={lengths}"
        )
        compile_warmup(trainer, 1)
        assert counters["stats"]["unique_graphs"] == lengths.count(",") + 1
        trainer.evaluate()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(MAX_STEPS):
                trainer.train_step()
        trainer.close()
    finally:
        shapes_log.removeHandler(handler)
        torch._logging.set_logs()
    assert symbols == []


def test_checkpoint_minutes_saves_at_log_steps_once_the_time_has_passed(tmp_path):
    """training.checkpoint_minutes: a crash loses at most that much; with a tiny interval every
    log step saves, with 0 only the step-count checkpoints remain."""
    every_log = make_trainer(
        tmp_path, "training.checkpoint_every=0", "training.checkpoint_minutes=1e-9",
        "training.log_every=3", "training.keep_checkpoints=0",
    )  # fmt: skip
    every_log.run()
    every_log.close()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path / "run")] == [3, 6, 9, 12]
    (tmp_path / "off").mkdir()
    off = make_trainer(
        tmp_path / "off", "training.checkpoint_every=0", "training.checkpoint_minutes=0",
        "training.log_every=3", "training.keep_checkpoints=0",
    )  # fmt: skip
    off.run()
    off.close()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path / "off" / "run")] == [12]


def test_the_clock_is_synchronised_at_every_step_that_reads_it(tmp_path):
    """Every step whose time is written (a metrics record, the summary at the last step) is one
    where the trainer synchronises the GPU before stopping the clock; with log_every=3 and
    eval_every=5 over 7 steps that includes step 7, a multiple of neither."""
    trainer = make_trainer(
        tmp_path,
        "training.max_steps=7",
        "training.log_every=3",
        "training.eval_every=5",
        "training.checkpoint_every=4",
    )
    trainer.run()
    written = {json.loads(ln)["step"] for ln in (trainer.run_dir / "metrics.jsonl").open()}
    synchronised = {s for s in range(1, 8) if trainer.clock_read_at(s)}
    assert written - {0} <= synchronised and 7 in synchronised
    assert synchronised == {3, 4, 5, 6, 7}  # and nowhere else: those overlap the next launch
    trainer.close()


def test_a_run_without_checkpoints_writes_none_even_when_stopped(tmp_path):
    """training.save_checkpoints=false: neither the periodic, the final nor the on-signal
    checkpoint is written, and the run still trains, evaluates and reports."""
    trainer = make_trainer(tmp_path, "training.save_checkpoints=false")
    summary = trainer.run()
    assert summary["steps"] == MAX_STEPS and summary["checkpoint"] is None
    assert math.isfinite(summary["final_val_loss"])
    (tmp_path / "b").mkdir()
    stopped = make_trainer(tmp_path / "b", "training.save_checkpoints=false")
    stopped.train_step()
    stopped.preemption.signum = signal.SIGTERM  # as the handler sets it
    assert stopped.interrupted()["checkpoint"] is None
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".safetensors", ".dcp")]
    assert written == []
    trainer.close(), stopped.close()
