"""End-to-end: the muongpt-train Hydra application, its run directory, and its bad-input errors."""

import json
import subprocess
import sys

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
        (["training.attn_window_start=64"], "attn_window_start needs a model with an attention"),
        (["model=speedrun"], "model.backout_after must be in [0, n_layer = 4)"),
        (["training.cooldown_frac=1.5"], "training.cooldown_frac must be in [0, 1]"),
        (["kernels.converters=[fp8]"], "kernels.converters: unknown ['fp8']"),
        (["kernels.converters=[flex_attention]"], "flex_attention needs a document-masked model"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, overrides, message):
    proc = train(*SMALL, *overrides, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err


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
