"""`muongpt plot` on real run directories, made by a short Hydra multirun of the trainer."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from muongpt import MuonGPTError
from muongpt.cli import plot as plot_cli

pytestmark = pytest.mark.slow  # trains two tiny runs in a subprocess (~20 s)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPTIMIZERS = ("adamw", "muon")
# A 1-layer, 32-wide GPT for 3 steps of 32 tokens, validated after every step.
TRAIN_OVERRIDES = [
    "model/size=tiny",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "training.max_steps=3",
    "training.seq_len=16",
    "training.batch_size=2",
    "training.micro_batch_size=2",
    "training.eval_every=1",
    "training.eval_tokens=32",
    "training.log_every=1",
    "training.warmup_steps=0",
    "training.cooldown_steps=0",
    "training.progress_bar=false",
    "training.sample_tokens=1",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """runs/multirun-like folder with one real run per optimizer: 0_adamw, 1_muon."""
    root = tmp_path_factory.mktemp("runs")
    sweep_dir = root / "multirun" / "stamp"
    cmd = [sys.executable, "-m", "muongpt.train", "-m", f"optimizer={','.join(OPTIMIZERS)}"]
    cmd += TRAIN_OVERRIDES
    cmd += [f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}_${optimizer.name}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_of_a_sweep_writes_png_and_table(sweep, tmp_path, capsys):
    out, table_file = tmp_path / "cmp.png", tmp_path / "cmp.md"
    rc = plot_cli.main([str(sweep), "--out", str(out), "--table", str(table_file)])
    stdout, _ = capsys.readouterr()
    assert rc == 0
    width, height = png_size(out)
    assert (width, height) == (17 * 120, int(5.2 * 120))
    assert out.stat().st_size > 20_000
    table = table_file.read_text().strip()
    assert stdout.strip() == table
    rows = table.splitlines()[2:]
    assert len(rows) == len(OPTIMIZERS)
    for row, name in zip(rows, OPTIMIZERS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        last = metrics(sweep / f"{OPTIMIZERS.index(name)}_{name}")[-1]
        assert cells[0] == f"tiny: optimizer={name}"
        assert cells[1] == "3"
        assert cells[2] == f"{last['tokens']:,}"
        assert cells[3] == f"{last['elapsed_s']:.1f}"
        assert cells[5] == f"{last['train_loss']:.4f}"
        assert cells[6] == f"{last['val_loss']:.4f}"
        records = metrics(sweep / f"{OPTIMIZERS.index(name)}_{name}")
        peaks = [r["peak_mem_gb"] for r in records if "peak_mem_gb" in r]  # recorded on GPUs only
        assert cells[7] == (f"{max(peaks):.2f}" if peaks else "—")


def test_figure_has_three_panels_with_every_run(sweep):
    paths = plot_cli.find_runs([sweep])
    assert [p.name for p in paths] == ["0_adamw", "1_muon"]
    runs = [plot_cli.load_run(p) for p in paths]
    shared = plot_cli.label_runs(runs)
    assert "training.max_steps=3" in shared and not any("optimizer" in o for o in shared)
    fig = plot_cli.plot_runs(runs)
    axes = fig.axes[:3]
    assert [ax.get_xlabel() for ax in axes] == ["step", "tokens", "training time (s)"]
    for ax, x_key in zip(axes, ("step", "tokens", "elapsed_s")):
        lines = ax.get_lines()
        assert len(lines) == 2 * len(runs)  # train and val per run
        for i, path in enumerate(paths):
            records = metrics(path)
            train, val = lines[2 * i], lines[2 * i + 1]
            assert list(train.get_xdata()) == [r[x_key] for r in records if "train_loss" in r]
            assert list(train.get_ydata()) == [
                r["train_loss"] for r in records if "train_loss" in r
            ]
            assert list(val.get_xdata()) == [r[x_key] for r in records if "val_loss" in r]
            assert list(val.get_ydata()) == [r["val_loss"] for r in records if "val_loss" in r]
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["tiny: optimizer=adamw", "tiny: optimizer=muon", "train", "val"]


def test_run_dirs_given_one_by_one_and_a_run_in_progress(sweep, tmp_path, capsys):
    running = tmp_path / "running"
    shutil.copytree(sweep / "1_muon", running)
    lines = (running / "metrics.jsonl").read_text().splitlines()
    # Two complete records, then a line cut off in the middle of a write.
    (running / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])
    out = tmp_path / "p.png"
    rc = plot_cli.main([str(sweep / "0_adamw"), str(running), "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert rc == 0 and png_size(out)
    rows = stdout.strip().splitlines()[2:]
    assert "| 3 |" in rows[0]
    assert "| 2 / 3 (running) |" in rows[1]
    assert f"{json.loads(lines[2])['val_loss']:.4f}" in rows[1]


def run_plot(argv, capsys):
    rc = plot_cli.main(argv)
    _, err = capsys.readouterr()
    return rc, err


def test_bad_run_dirs(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_plot([str(empty), "--out", str(tmp_path / "x.png")], capsys)
    assert rc == 2 and err.startswith("error: ") and "metrics.jsonl" in err and str(empty) in err
    assert not (tmp_path / "x.png").exists()

    no_metrics = tmp_path / "no_metrics"
    shutil.copytree(sweep / "0_adamw", no_metrics)
    (no_metrics / "metrics.jsonl").unlink()
    rc, err = run_plot([str(no_metrics)], capsys)
    assert rc == 2 and "no metrics.jsonl" in err and err.count("\n") == 1

    rc, err = run_plot([str(tmp_path / "absent")], capsys)
    assert rc == 2 and "not a directory" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(sweep / "0_adamw", corrupt)
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (corrupt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = run_plot([str(corrupt)], capsys)
    assert rc == 2 and "metrics.jsonl:2" in err


def test_sweep_with_a_run_not_started_yet(sweep, tmp_path, capsys):
    partial = tmp_path / "partial_sweep"
    shutil.copytree(sweep, partial)
    (partial / "1_muon" / "metrics.jsonl").unlink()
    assert plot_cli.find_runs([partial]) == [partial / "0_adamw"]
    assert "1_muon" in capsys.readouterr().err
    (partial / "0_adamw" / "metrics.jsonl").write_text("")
    with pytest.raises(MuonGPTError, match="none of its 2 runs"):
        plot_cli.find_runs([partial])
