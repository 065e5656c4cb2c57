"""End-to-end: the muongpt-train Hydra application, its run directory, and its bad-input errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muongpt.train.checkpoint import load_checkpoint

SMALL = [
    "training.max_steps=12",
    "training.seq_len=32",
    "training.batch_size=8",
    "training.micro_batch_size=4",
    "training.warmup_steps=2",
    "training.cooldown_steps=4",
    "training.eval_every=6",
    "training.eval_tokens=1024",
    "training.log_every=3",
    "training.sample_tokens=8",
    "training.progress_bar=false",
]


def train(*overrides, cwd):
    return subprocess.run(
        [sys.executable, "-m", "muongpt.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_default_experiment_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "model: " in out and "parameters" in out
    assert "--- sample ---" in out
    assert "final val loss" in out and "unigram entropy" in out

    # The resolved config, one JSON object per log step, and a final checkpoint.
    assert "experiment_name: tiny" in (run_dir / "config.yaml").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12]
    for r in train_records:
        assert {"step", "tokens", "train_loss", "lr", "elapsed_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 32
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3  # step 0, 6 and 12
    assert vals[-1] < vals[0] - 1.0, vals  # it learned
    ckpt = load_checkpoint(run_dir / "checkpoints" / "step_000012.pt")
    assert ckpt["step"] == 12 and ckpt["config"]["model"]["n_layer"] == 4

    # train.log holds the run's messages, not only the console
    log = (run_dir / "train.log").read_text()
    assert "model: " in log and "step 12: val loss" in log and "final val loss" in log
    # the report card: summary.json, report.md and its loss curve beside it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["final_val_loss"] == vals[-1]
    assert summary["params"] > summary["params_non_embedding"] > 0
    assert "training.max_steps=12" in summary["overrides"] and summary["sample"]
    report = (run_dir / "report.md").read_text()
    assert f"| final val loss | {vals[-1]:.4f} nats/token |" in report
    assert f"| unigram entropy | {summary['unigram_entropy']:.4f} nats/token |" in report
    assert "| MFU | n/a" in report and "![loss curve](val_loss.png)" in report
    assert summary["sample"].strip() in report
    assert (run_dir / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert f"report: {run_dir / 'report.md'}" in out


@pytest.mark.parametrize(
    "size,n_layer,n_embd",
    [("d12", 12, 768), ("d24", 24, 1024), ("d36", 36, 1280), ("d48", 48, 1600)],
)
def test_size_override_changes_the_model(size, n_layer, n_embd):
    from hydra import compose, initialize_config_dir

    from muongpt.config import CONF_DIR, model_config, register_configs
    from muongpt.model import build_model

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model/size={size}"])
    with torch.device("meta"):
        model = build_model(model_config(cfg.model))
    # 12 d^2 per layer plus the untied, padded embedding and head.
    assert model.num_params() == 12 * n_layer * n_embd**2 + 2 * 50304 * n_embd


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["training.no_such_key=1"], "no_such_key"),
        (["model/size=d13"], "d13"),
        (["model.n_embd=130"], "divisible by model.n_head"),
        (["training.batch_size=0"], "batch_size"),
        (["training.batch_size=6", "training.micro_batch_size=4"], "multiple of micro_batch_size"),
        (["data=bench", "data.train_files=/nonexistent/*.bin"], "no shard files match"),
        (["data.train_files=x/*.bin"], "data.train_files is not read with data.source=text"),
        (["data=bench", "data.text_path=a.txt"], "data.text_path is not read with data.source="),
        (["data=bench", "data.val_fraction=0.05"], "data.val_fraction is not read with data.s"),
        (["data.val_fraction=1.5"], "data.val_fraction must be in (0, 1), got 1.5"),
        (["training.attn_window_start=64"], "attn_window_start needs a model with an attention"),
        (["model=speedrun"], "model.backout_after must be in [0, n_layer = 4)"),
        (["training.cooldown_frac=1.5"], "training.cooldown_frac must be in [0, 1]"),
        (["training.cooldown_shape=cosine"], "training.cooldown_shape must be one of ['linear',"),
        (["kernels.converters=[fp8]"], "kernels.converters: unknown ['fp8']"),
        (["kernels.converters=[flex_attention]"], "flex_attention needs a document-masked model"),
        (["+training.max_step=10"], "unknown key training.max_step (did you mean max_steps"),
        (["training.max_steps=abc"], "training.max_steps must be an int, got 'abc'"),
        (["training.max_steps=0"], "training.max_steps must be >= 1, got 0"),
        (["training.eval_every=0"], "training.eval_every must be >= 1, got 0"),
        pytest.param(
            ["training.device=cuda"],
            "no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, overrides, message):
    run_dir = tmp_path / "runs" / "r"
    proc = train(*SMALL, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    # the run failed before step 1: no folder left behind (runs/ was made for it, so it goes too)
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))


def test_empty_training_text_names_its_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = train(*SMALL, f"data.text_path={empty}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err == f"error: data.text_path {empty}: the file is empty, no text to train on"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_run_folder_that_cannot_be_made_is_one_line(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run_dir = blocker / "run" if where == "under_a_file" else Path("/proc/muongpt_run")
    if where == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    proc = train(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: hydra.run.dir: cannot create folder {run_dir} ("), err
    if where == "under_a_file":
        assert err.endswith(f"({blocker} is a file, not a folder)")


def test_a_failed_run_keeps_a_folder_that_holds_results(tmp_path):
    from muongpt.train.__main__ import remove_if_empty

    hydra_only = tmp_path / "hydra_only"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "train.log").write_text("")
    assert remove_if_empty(hydra_only) and not hydra_only.exists()
    with_results = tmp_path / "with_results"
    (with_results / ".hydra").mkdir(parents=True)
    (with_results / "checkpoints").mkdir()
    assert not remove_if_empty(with_results) and (with_results / "checkpoints").is_dir()


@pytest.mark.parametrize("command", [["-m", "muongpt.train"], ["-m", "muongpt.cli.main", "bench"]])
def test_help_is_short_and_names_the_main_keys(tmp_path, command):
    proc = subprocess.run(
        [sys.executable, *command, "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: muongpt") and 20 < len(lines) < 45, proc.stdout
    for word in ("config groups", "optimizer", "training.max_steps=N", "experiment=NAME"):
        assert word in proc.stdout
    assert not list(tmp_path.iterdir())  # help runs nothing


def test_corrupt_shard_is_one_line_error(tmp_path):
    bad = tmp_path / "train_000001.bin"
    bad.write_bytes(b"\x00" * 2048)
    good_dir = tmp_path / "val"
    good_dir.mkdir()
    from muongpt.data.shards import write_shard

    write_shard(good_dir / "val_000000.bin", torch.arange(5000) % 100)
    proc = train(
        *SMALL,
        "data=bench",
        f"data.train_files={bad}",
        f"data.val_files={good_dir}",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "bad magic" in err and str(bad) in err and len(err.splitlines()) == 1, err


def test_progress_bar_starts_after_the_step0_evaluation(tmp_path, monkeypatch):
    """The bar's rate (and so its ETA) must not include the step-0 evaluation's time."""
    from hydra import compose, initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs
    from muongpt.train import trainer as trainer_module

    register_configs()
    drop = ("training.max_steps", "training.warmup_steps", "training.cooldown_steps")
    overrides = [o for o in SMALL if not o.startswith(drop)] + [
        "training.max_steps=1",
        "training.warmup_steps=0",
        "training.cooldown_steps=0",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + ["model.n_layer=1"])
    events = []

    class RecordingTqdm(trainer_module.tqdm):
        def __init__(self, *args, **kwargs):
            events.append("bar")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", RecordingTqdm)
    trainer = trainer_module.Trainer(cfg, tmp_path)
    real_evaluate = trainer.evaluate
    trainer.evaluate = lambda: events.append(f"eval at step {trainer.step}") or real_evaluate()
    try:
        trainer.run()
    finally:
        trainer.close()
    assert events[:2] == ["eval at step 0", "bar"], events


@pytest.mark.slow
def test_resume_auto_without_a_run_folder_takes_the_newest_unfinished_run(tmp_path):
    run = [*SMALL, "training.checkpoint_every=6"]
    first = train(*run, "hydra.run.dir=runs/tiny/first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # a finished run (summary.json) is not resumed: one line says how to name one
    proc = train(*run, "training.resume=auto", cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no unfinished run of tiny" in err and "hydra.run.dir=RUN_FOLDER" in err, err
    # the same run, had it not finished: resumed in its own folder, no new one made
    (tmp_path / "runs/tiny/first/summary.json").unlink()
    proc = train(*run, "training.resume=auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        f"resuming the newest unfinished run of tiny: {tmp_path / 'runs/tiny/first'}" in proc.stdout
    )
    assert [p.name for p in (tmp_path / "runs/tiny").iterdir()] == ["first"]
