"""Runs that never lie: finite checkpoints, protected run directories, full disks, damaged files.

Each bad input must give one error (at most 3 lines on stderr from the CLI) naming the problem,
and lose nothing already written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from muongpt import DiskFullError, MuonGPTError
from muongpt.train import checkpoint as ckpt
from muongpt.train import resilience
from muongpt.train.resilience import NonFiniteLossError, RunDirError

RUN = [
    "model/size=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "training.device=cpu",
    "training.max_steps=6",
    "training.seq_len=32",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.warmup_steps=1",
    "training.cooldown_steps=2",
    "training.log_every=1",
    "training.eval_every=3",
    "training.eval_tokens=256",
    "training.checkpoint_every=1",
    "training.keep_checkpoints=0",
    "training.sample_tokens=4",
    "training.progress_bar=false",
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*RUN, *overrides])


def make_trainer(run_dir: Path, *overrides: str):
    from muongpt.train.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(compose(*overrides), run_dir)


def cli(run_dir: Path, *overrides: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m muongpt.train`` (after ``prelude``, Python run first in the same process)."""
    code = prelude + "\nimport sys\nfrom muongpt.train.__main__ import main\nmain()\n"
    argv = [*RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI failed with at most 3 lines on stderr, no traceback, naming every word."""
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None), err
    assert "Traceback" not in err, err
    assert 1 <= len(err.splitlines()) <= 3, err
    for word in words:
        assert word in err, err
    return err


# ---------------------------------------------------------------- 1. finite checkpoints
def test_a_non_finite_update_is_never_saved_and_the_last_good_checkpoint_resumes(tmp_path):
    # Update 3 writes inf into a weight; the loss of step 3 (computed before it) is finite, so
    # only a look at the tensors themselves stops the checkpoint of step 3.
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir)
    step = trainer.optimizer.step

    def breaks_at_3():
        step()
        if trainer.step + 1 == 3:
            with torch.no_grad():
                trainer.model.lm_head.weight[0, 0] = float("inf")

    trainer.optimizer.step = breaks_at_3
    try:
        with pytest.raises(NonFiniteLossError) as info:
            trainer.run()
    finally:
        trainer.close()
    good = ckpt.checkpoint_path(run_dir, 2)
    message = str(info.value)
    assert "non-finite weights or optimizer state after step 3" in message, message
    assert "model.lm_head.weight" in message and f"last good checkpoint: {good}" in message
    assert "\n" not in message
    assert ckpt.list_checkpoints(run_dir) == [ckpt.checkpoint_path(run_dir, s) for s in (1, 2)]
    state = ckpt.load_resumable(good)
    assert resilience.non_finite_tensors(state) == []
    resumed = make_trainer(run_dir, "training.resume=auto")
    assert resumed.resumed_from == good and resumed.step == 2
    resumed.close()


def test_lr_inf_on_the_command_line_is_one_line_and_saves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(run_dir, "optimizer.lr=inf")
    one_error(proc, "non-finite weights or optimizer state after step 1", "no checkpoint saved")
    assert ckpt.list_checkpoints(run_dir) == []


def test_non_finite_tensors_names_nested_floating_tensors():
    tree = {
        "model": {"w": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
        "optimizer": {"state": [{"exp_avg": torch.tensor([float("-inf")])}]},
        "steps": torch.tensor([1, 2]),  # integers cannot be non-finite
    }
    assert resilience.non_finite_tensors(tree) == ["model.b", "optimizer.state.0.exp_avg"]


# ---------------------------------------------------------------- 2. protected run directories
def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir)
    trainer.train_step()
    saved = trainer.save_checkpoint()
    trainer.close()
    before = saved.read_bytes()
    with pytest.raises(RunDirError) as info:
        make_trainer(run_dir)
    message = str(info.value)
    assert str(run_dir) in message and "already holds a run" in message
    assert "training.resume=auto" in message and "hydra.run.dir" in message
    assert saved.read_bytes() == before  # nothing deleted


def test_a_fresh_run_refuses_a_directory_with_metrics_only(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text('{"step": 0, "val_loss": 10.9}\n')
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the earlier run's\n")
    proc = cli(run_dir)
    one_error(proc, str(run_dir), "already holds a run", "training.resume=auto", "hydra.run.dir")
    assert metrics.read_text() == '{"step": 0, "val_loss": 10.9}\n'
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the earlier run's\n"
    assert not (run_dir / "config.yaml").exists()


def test_a_second_process_in_a_locked_run_directory_refuses(tmp_path):
    run_dir = tmp_path / "run"
    first = make_trainer(run_dir)  # holds the lock until close
    try:
        with pytest.raises(RunDirError) as info:
            make_trainer(run_dir, "training.resume=auto")
        message = str(info.value)
        assert f"run directory {run_dir} is in use by another muongpt run (pid {os.getpid()})" in (
            message
        )
    finally:
        first.close()
    make_trainer(run_dir).close()  # released: the directory is usable again


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom muongpt.train.resilience import RunDirLock\n"
            f"lock = RunDirLock({str(run_dir)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            resilience.RunDirLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    resilience.RunDirLock(run_dir).acquire().release()


def test_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live = folder / f".step_000004.pt.tmp-{sleeper.pid}"
        mine = folder / f".step_000005.pt.tmp-{os.getpid()}"
        stale = folder / f".step_000003.pt.tmp-{dead.pid}"
        for p in (live, mine, stale):
            p.write_bytes(b"partial")
        ckpt.remove_stale_temporaries(tmp_path)
        assert live.exists() and mine.exists() and not stale.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- 3. metrics of a killed start
def test_resume_before_the_first_checkpoint_starts_metrics_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text('{"step": 0, "val_loss": 10.9}\n{"step": 1, "train_loss": 10.8}\n{"st')
    trainer = make_trainer(
        run_dir, "training.resume=auto", "training.max_steps=2", "training.cooldown_steps=1"
    )
    trainer.run()
    trainer.close()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_metrics_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    resilience.append_metrics(path, {"step": 1, "lr": float("inf"), "val_loss": float("nan")})
    line = path.read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "step": 1,
        "lr": None,
        "val_loss": None,
    }


# ---------------------------------------------------------------- 4. full disks
UNEXPECTED_POS = (
    "[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4352\n"
    "frame #0: c10::ThrowEnforceNotMet(...)"
)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(UNEXPECTED_POS)],
    ids=["ENOSPC", "unexpected-pos"],
)
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, error):
    previous = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {"model": {}, "config": {}})
    target = ckpt.checkpoint_path(tmp_path, 2)
    real_save = torch.save

    def fills_the_disk(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:
            handle.truncate(50)
        raise error

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(DiskFullError) as info:
        ckpt.save_checkpoint(target, {"model": {}, "config": {}})
    monkeypatch.undo()
    assert str(info.value) == f"{target}: no space left on device; free some space and rerun"
    assert ckpt.list_checkpoints(tmp_path) == [previous]
    assert sorted(p.name for p in previous.parent.iterdir()) == [previous.name]  # no temporary
    ckpt.load_checkpoint(previous)


def a_sharded_checkpoint(tmp_path: Path):
    """(model, optimizer, state, path): a small model's .dcp checkpoint of step 2 in tmp_path."""
    from muongpt.train.fsdp import save_sharded, sharded_state

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {**sharded_state(model, [optimizer]), "config": {}, "step": 2}
    return model, optimizer, state, save_sharded(tmp_path / "step_000002.dcp", state, True)


def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_previous(
    tmp_path, monkeypatch
):
    """FSDP's .dcp checkpoint: a full disk while torch.distributed.checkpoint writes (which
    reports it as a CheckpointException, a BaseException holding each rank's error) or while the
    trainer state is saved is one line naming the checkpoint; the earlier checkpoint of the same
    step stays and no temporary folder is left."""
    from muongpt.train.fsdp import save_sharded

    _, _, state, path = a_sharded_checkpoint(tmp_path)
    before = sorted(p.name for p in path.iterdir())

    real_save, calls, fail_at = torch.save, [], [0]

    def fills_the_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == fail_at[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    save_sharded(tmp_path / "count.dcp", state, is_main=True)  # how many saves one takes
    shutil.rmtree(tmp_path / "count.dcp")
    saves, calls[:] = len(calls), []
    assert saves >= 2  # the checkpoint library's own, then the trainer state's
    for fail_at[0] in (1, saves):
        with pytest.raises(DiskFullError) as info:
            save_sharded(path, state, is_main=True)
        assert str(info.value) == f"{path}: no space left on device; free some space and rerun"
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
        assert sorted(p.name for p in path.iterdir()) == before
        calls.clear()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_sharded_checkpoint_is_one_line(tmp_path, damage):
    """A .dcp checkpoint whose shard file is cut short or gone: torch.distributed.checkpoint
    raises a CheckpointException (a BaseException whose message is every rank's traceback);
    loading it is one line naming the folder and the rank's error."""
    from muongpt.train.fsdp import load_sharded

    model, optimizer, _, path = a_sharded_checkpoint(tmp_path)
    (shard,) = path.glob("*.distcp")
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    with pytest.raises(MuonGPTError) as info:
        load_sharded(path, model, [optimizer])
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable sharded checkpoint (")
    assert "rank 0" in message and "\n" not in message


def test_a_full_disk_for_metrics_is_one_line():
    # /dev/full: every write fails with ENOSPC, as on a full file system.
    with pytest.raises(DiskFullError, match="^/dev/full: no space left on device"):
        resilience.append_metrics("/dev/full", {"step": 1})


def test_a_full_disk_while_resume_cuts_the_metrics_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    path.write_text(text)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="metrics.jsonl: no space left on device"):
        resilience.truncate_metrics(path, 1)
    monkeypatch.undo()
    assert path.read_text() == text and list(tmp_path.iterdir()) == [path]


def test_a_full_disk_during_the_export_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    def fails(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fails)
    out = tmp_path / "model.safetensors"
    with pytest.raises(DiskFullError, match="model.safetensors: no space left"):
        ckpt.export_safetensors({"w": torch.ones(2)}, out)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_a_training_run_is_one_line_on_stderr(tmp_path):
    run_dir = tmp_path / "run"
    prelude = textwrap.dedent(
        """
        import torch
        real, calls = torch.save, []
        def save(obj, f, *args, **kwargs):
            calls.append(f)
            if len(calls) == 3:  # the third checkpoint meets a full disk
                real(obj, f, *args, **kwargs)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1")
            return real(obj, f, *args, **kwargs)
        torch.save = save
        """
    )
    proc = cli(run_dir, prelude=prelude)
    one_error(proc, "step_000003.pt: no space left on device")
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(run_dir)] == [1, 2]
    ckpt.load_resumable(ckpt.checkpoint_path(run_dir, 2))


def test_an_error_under_the_progress_bar_is_a_line_of_its_own(tmp_path):
    # tiny Shakespeare holds one end-of-text token: no room for BOS-aligned rows
    proc = cli(tmp_path / "run", "training.progress_bar=true", "data.align_to_bos=true")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # the bar is closed before the error is printed
    assert last.startswith("error: data.text_path "), proc.stderr
    assert "(training split): no room for one BOS-aligned batch" in last, proc.stderr


# ---------------------------------------------------------------- 5. checkpoint integrity
def flip_a_tensor_byte(path: Path) -> None:
    """Change one byte inside a tensor record (not the zip structure): only the CRC can tell."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 8)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(info.header_offset + 30 + int(name_len) + int(extra_len) + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_bytes_are_detected_and_the_damaged_newest_is_skipped(tmp_path):
    for step in (1, 2):
        state = {"model": {"w": torch.full((64,), float(step))}, "config": {}, "step": step}
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), state)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    flip_a_tensor_byte(newest)
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint .CRC32 mismatch") as info:
        ckpt.load_checkpoint(newest)
    assert str(newest) in str(info.value) and "\n" not in str(info.value)
    warnings = []
    ckpt.RESUME_KEYS, keys = ("model",), ckpt.RESUME_KEYS
    try:
        path, _ = ckpt.find_resume_checkpoint("auto", tmp_path, warn=warnings.append)
    finally:
        ckpt.RESUME_KEYS = keys
    assert path == ckpt.checkpoint_path(tmp_path, 1)
    assert len(warnings) == 1 and str(newest) in warnings[0] and "CRC32" in warnings[0]


@pytest.mark.parametrize("content", [b"\x00" * 4096, b"hello, this is a text file\n"])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, content):
    path = tmp_path / "step_000001.pt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a muongpt checkpoint") and "Unsupported" not in message


def test_an_error_inside_another_message_is_its_type_and_one_line_cut_at_a_word():
    from muongpt import error_line

    text = "\x1b[31mabc1234\x1b[0m xy " + "abc1234 xy " * 30 + "\nTraceback ...\nmore"
    line = error_line(RuntimeError(text))  # 160 falls inside a word; colour codes, more lines
    assert line.startswith("RuntimeError: abc1234 xy abc1234")
    cut = line.removeprefix("RuntimeError: ")
    assert cut.endswith(" ...") and len(cut) <= 165
    assert set(cut.removesuffix(" ...").split()) == {"abc1234", "xy"}
    assert error_line(EOFError()) == "EOFError"
    assert error_line(KeyError("step")) == "KeyError: 'step'"


# ---------------------------------------------------------------- 6. bad data and crafted exports
@pytest.mark.parametrize("bad_id", [60000, 50300])
def test_the_val_loader_checks_token_ids(tmp_path, bad_id):
    from muongpt.data.shards import write_shard

    tokens = np.arange(2000) % 50000
    train = write_shard(tmp_path / "train_000001.bin", tokens)
    val_tokens = tokens.copy()
    val_tokens[77] = bad_id
    val = write_shard(tmp_path / "val_000000.bin", val_tokens)
    trainer = make_trainer(
        tmp_path / "run", "data=bench", f"data.train_files={train}", f"data.val_files={val}"
    )
    try:
        with pytest.raises(MuonGPTError) as info:
            trainer.evaluate()
    finally:
        trainer.close()
    message = str(info.value)
    assert str(val) in message and str(bad_id) in message and "\n" not in message


def tiny_export(tmp_path: Path, config_change) -> Path:
    from omegaconf import OmegaConf

    from muongpt.config import model_config
    from muongpt.model import build_model

    cfg = compose()
    model = build_model(model_config(cfg.model))
    config = OmegaConf.to_container(cfg, resolve=True)
    config_change(config["model"])
    out = tmp_path / "model.safetensors"
    ckpt.export_safetensors(model.state_dict(), out, {"step": 1, "config": config})
    return out


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda m: m.update(n_embd=2**20, n_layer=1000), "1000 layers"),
        (lambda m: m.update(n_layer=3), "3 layers"),
        (lambda m: m.update(mlp_ratio=8), "mlp.fc.weight"),
    ],
    ids=["huge", "one-more-layer", "mlp-ratio"],
)
def test_a_crafted_export_config_is_checked_before_allocation(tmp_path, change, words):
    from muongpt.generate import load_model

    path = tiny_export(tmp_path, change)
    with pytest.raises(ckpt.CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "its config does not fit its weights" in message and words in message, message


# ---------------------------------------------------------------- 9. smaller items
def test_a_changed_seed_on_resume_says_it_has_no_effect():
    logged = []
    resilience.check_resume_config(
        {"training": {"seed": 1}}, {"training": {"seed": 2}}, Path("x.pt"), log=logged.append
    )
    assert logged == [
        "resuming with changed settings: training.seed (checkpoint 1, requested 2) has no "
        "effect: a resumed run continues the checkpoint's random streams"
    ]


def test_unreadable_files_are_pruned_with_the_checkpoints_they_precede(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"model": {}, "config": {}})
    folder = tmp_path / "checkpoints"
    old_bad = folder / "step_000002.pt.unreadable"
    new_bad = folder / "step_000005.pt.unreadable"
    old_bad.write_bytes(b"x")
    new_bad.write_bytes(b"x")
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert not old_bad.exists() and new_bad.exists()


def test_tokenizing_an_empty_corpus_is_an_error(tmp_path):
    from muongpt.data.corpus import CorpusError, tokenize_corpus

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="no documents in .*empty.txt"):
        tokenize_corpus([empty], tmp_path / "out", progress=False, processes=1)
    assert not list((tmp_path / "out").glob("*.bin"))


# ---------------------------------------------------------------- 12. direct checks
def gradients_of_one_step(run_dir: Path, *overrides: str) -> tuple[dict, torch.Tensor]:
    """The gradients the optimizer would apply at step 1 (the update itself is skipped)."""
    trainer = make_trainer(run_dir, "training.batch_size=8", *overrides)
    grads, rows = {}, []
    loader = trainer.train_loader

    class Recording:  # the trainer's loader, keeping the rows it hands out
        def __next__(self):
            inputs, targets = next(loader)
            rows.append(inputs)
            return inputs, targets

        def __getattr__(self, name):
            return getattr(loader, name)

    def capture():
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer.train_loader = Recording()
    trainer.optimizer.step = capture
    trainer.train_step()
    trainer.close()
    return grads, torch.cat(rows)


def test_accumulated_gradients_equal_one_batch_of_all_the_rows(tmp_path):
    accumulated, rows_a = gradients_of_one_step(tmp_path / "a", "training.micro_batch_size=2")
    whole, rows_b = gradients_of_one_step(tmp_path / "b", "training.micro_batch_size=8")
    assert rows_a.shape == (8, 32) and torch.equal(rows_a, rows_b)  # the same 8 rows
    assert accumulated.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7)


def test_sampling_rows_for_the_flop_count_leaves_the_data_position_unchanged(tmp_path):
    """bench's sample_training_rows reads batches ahead for the MFU's document term; the run
    must still see the batches it would have seen."""
    from muongpt.cli.bench import sample_training_rows

    trainer = make_trainer(tmp_path / "run")
    try:
        start = trainer.train_loader.state_dict()
        expected = [next(trainer.train_loader)[0].clone() for _ in range(3)]
        trainer.train_loader.load_state_dict(start)
        rows = sample_training_rows(trainer, batches=2)
        assert torch.equal(rows, torch.cat(expected[:2]).cpu())
        for batch in expected:
            assert torch.equal(next(trainer.train_loader)[0], batch)
    finally:
        trainer.close()
