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


def smoothed_train(records: list[dict], beta: float = 0.9) -> list[float]:
    return plot_cli.ema([r["train_loss"] for r in records if "train_loss" in r], beta)


def test_ema_is_bias_corrected_and_beta_zero_is_raw():
    assert plot_cli.ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])
    assert plot_cli.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    assert plot_cli.ema([1.0, 3.0], 0.0) == [1.0, 3.0]


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
    assert "| train loss (EMA) |" in table.splitlines()[0]
    rows = table.splitlines()[2:]
    assert len(rows) == len(OPTIMIZERS)
    for row, name in zip(rows, OPTIMIZERS):
        cells = [c.strip() for c in row.strip("|").split("|")]
        records = metrics(sweep / f"{OPTIMIZERS.index(name)}_{name}")
        last = records[-1]
        assert cells[0] == f"tiny: optimizer={name}"
        assert cells[1] == "3"
        assert cells[2] == f"{last['tokens']:,}"
        assert cells[3] == f"{last['elapsed_s']:.1f}"
        assert cells[5] == f"{smoothed_train(records)[-1]:.4f}"  # smoothed, not the last batch
        assert cells[6] == f"{last['val_loss']:.4f}"
        peaks = [r["peak_mem_gb"] for r in records if "peak_mem_gb" in r]  # recorded on GPUs only
        assert cells[7] == (f"{max(peaks):.2f}" if peaks else "—")


def test_figure_smoothed_train_val_markers_entropy_and_styles(sweep):
    paths = plot_cli.find_runs([sweep])
    assert [p.name for p in paths] == ["0_adamw", "1_muon"]
    runs = [plot_cli.load_run(p) for p in paths]
    entropy = json.loads((paths[0] / "summary.json").read_text())["unigram_entropy"]
    assert runs[0].entropy == runs[1].entropy == entropy  # same data: one reference line
    shared = plot_cli.label_runs(runs)
    assert "training.max_steps=3" in shared and not any("optimizer" in o for o in shared)
    fig = plot_cli.plot_runs(runs)
    axes = fig.axes[:3]
    assert [ax.get_xlabel() for ax in axes] == ["step", "tokens", "training time (s)"]
    for ax, x_key in zip(axes, ("step", "tokens", "elapsed_s")):
        lines = ax.get_lines()
        assert len(lines) == 3 * len(runs) + 1  # raw, smoothed, val per run; one entropy line
        for i, path in enumerate(paths):
            records = metrics(path)
            raw, smooth, val = lines[3 * i : 3 * i + 3]
            train_x = [r[x_key] for r in records if "train_loss" in r]
            assert list(raw.get_xdata()) == train_x and raw.get_alpha() < 0.5  # faint
            assert list(raw.get_ydata()) == [r["train_loss"] for r in records if "train_loss" in r]
            assert list(smooth.get_xdata()) == train_x
            assert list(smooth.get_ydata()) == pytest.approx(smoothed_train(records))
            assert list(val.get_xdata()) == [r[x_key] for r in records if "val_loss" in r]
            assert list(val.get_ydata()) == [r["val_loss"] for r in records if "val_loss" in r]
            assert val.get_linestyle() == "None" and val.get_marker() not in ("", "None")
        # identical runs stay visible: each run its own line style and marker
        assert lines[1].get_linestyle() != lines[4].get_linestyle()
        assert lines[2].get_marker() != lines[5].get_marker()
        assert (
            list(lines[-1].get_ydata()) == [entropy, entropy] and lines[-1].get_linestyle() == "--"
        )
    # every val point inside the frame, the step-0 one (the highest) included
    lo, hi = axes[0].get_ylim()
    vals = [r["val_loss"] for p in paths for r in metrics(p) if "val_loss" in r]
    assert lo <= min(vals) and max(vals) <= hi and lo <= entropy
    assert axes[0].get_xlim()[0] < 0  # the step-0 marker is not cut at the left edge
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == [
        "tiny: optimizer=adamw",
        "tiny: optimizer=muon",
        "train (EMA 0.9; raw faint)",
        "val",
        f"unigram entropy ({entropy:.3f})",
    ]
    assert axes[0].get_yscale() == "linear"
    assert plot_cli.plot_runs(runs, log_scale=True).axes[0].get_yscale() == "log"


def test_run_dirs_given_one_by_one_and_a_run_in_progress(sweep, tmp_path, capsys):
    running = tmp_path / "running"
    shutil.copytree(sweep / "1_muon", running)
    (running / "summary.json").unlink()
    lines = (running / "metrics.jsonl").read_text().splitlines()
    # Two complete records, then a line cut off in the middle of a write.
    (running / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])
    out = tmp_path / "p.png"
    rc = plot_cli.main([str(sweep / "0_adamw"), str(running), "--out", str(out), "--log-scale"])
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


def test_folders_that_are_not_runs_are_skipped_with_one_line(sweep, tmp_path, capsys):
    # runs/tiny/* as the README writes it, with a run that failed before writing metrics
    runs = tmp_path / "runs" / "tiny"
    shutil.copytree(sweep / "0_adamw", runs / "2026-12-01_10-00-00")
    failed = runs / "2026-12-01_10-05-00"
    shutil.copytree(sweep / "0_adamw" / ".hydra", failed / ".hydra")
    rc, err = run_plot([str(runs / "2026-12-01_10-00-00"), str(failed)], capsys)
    assert rc == 0
    assert err.splitlines() == [
        f"warning: {failed}: no metrics yet (not a run yet); skipped",
        f"plot: {runs / '2026-12-01_10-00-00' / 'loss.png'}",  # no --out: into the run folder
    ]
    assert png_size(runs / "2026-12-01_10-00-00" / "loss.png")
    # files among the runs: a plot made earlier passes silently, anything else is named
    (runs / "loss.png").write_bytes(b"")
    (runs / "notes.txt").write_text("x")
    rc, err = run_plot(
        [
            str(runs / "2026-12-01_10-00-00"),
            str(runs / "loss.png"),
            str(runs / "notes.txt"),
            "--out",
            str(tmp_path / "o.png"),
        ],
        capsys,
    )
    assert rc == 0 and err.splitlines() == [
        f"warning: {runs / 'notes.txt'}: a file, not a run folder; skipped",
        f"plot: {tmp_path / 'o.png'}",
    ]

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_plot([str(empty), "--out", str(tmp_path / "x.png")], capsys)
    assert rc == 2 and err.splitlines() == [
        f"warning: {empty}: no metrics.jsonl here or in sub-folders; skipped",
        f"error: no run with metrics in {empty}",
    ]
    assert not (tmp_path / "x.png").exists()


def test_default_out_of_several_runs_is_the_folder_holding_them(sweep, tmp_path, capsys):
    rc, err = run_plot([str(sweep / "0_adamw"), str(sweep / "1_muon")], capsys)
    assert rc == 0 and err.strip() == f"plot: {sweep / 'loss.png'}"
    assert png_size(sweep / "loss.png")
    (sweep / "loss.png").unlink()


def test_bad_run_dirs_and_outputs(sweep, tmp_path, capsys):
    rc, err = run_plot([str(tmp_path / "absent")], capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'absent'}: not a directory\n"

    corrupt = tmp_path / "corrupt"
    shutil.copytree(sweep / "0_adamw", corrupt)
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (corrupt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = run_plot([str(corrupt)], capsys)
    assert rc == 2 and "metrics.jsonl:2" in err and err.count("\n") == 1

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = run_plot([str(sweep / "0_adamw"), "--out", str(blocker / "p.png")], capsys)
    assert rc == 2
    assert (
        err == f"error: --out: cannot create folder {blocker} ({blocker} is a file, not a folder)\n"
    )
    if Path("/proc").is_dir():
        rc, err = run_plot([str(sweep / "0_adamw"), "--out", "/proc/x.png"], capsys)
        # refused before plotting: /proc takes no new files
        assert rc == 2 and err.startswith("error: --out: cannot write into folder /proc (")
        assert err.count("\n") == 1


def test_sweep_with_a_run_not_started_yet(sweep, tmp_path, capsys):
    partial = tmp_path / "partial_sweep"
    shutil.copytree(sweep, partial)
    (partial / "1_muon" / "metrics.jsonl").unlink()
    assert plot_cli.find_runs([partial]) == [partial / "0_adamw"]
    assert "1_muon" in capsys.readouterr().err
    (partial / "0_adamw" / "metrics.jsonl").write_text("")
    with pytest.raises(MuonGPTError, match="no run with metrics"):
        plot_cli.find_runs([partial])
    assert "none of its 2 runs has metrics yet" in capsys.readouterr().err


def test_report_regenerates_each_run_and_compares_them(sweep, tmp_path, capsys):
    from muongpt.cli import report as report_cli

    runs = tmp_path / "sweep"
    shutil.copytree(sweep, runs)
    for name in ("0_adamw", "1_muon"):
        (runs / name / "report.md").unlink()  # written by the run: gone, then regenerated
    (runs / "1_muon" / "summary.json").unlink()  # an unfinished run has no summary yet
    eval_json = {
        "checkpoint": "x",
        "step": 3,
        "total": {"tokens": 100, "loss": 5.5, "bits_per_byte": 2.25},
    }
    (runs / "0_adamw" / "eval.json").write_text(json.dumps(eval_json))
    rc = report_cli.main([str(runs)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.splitlines() == [f"report: {runs / n / 'report.md'}" for n in ("0_adamw", "1_muon")]
    table = out.strip().splitlines()
    assert table[0].startswith("| run | steps | tokens |") and len(table) == 4
    summary = json.loads((runs / "0_adamw" / "summary.json").read_text())
    assert f"| tiny: optimizer=adamw | 3 | {summary['tokens']:,} |" in table[2]
    assert f"| {summary['final_val_loss']:.4f} | {summary['unigram_entropy']:.4f} |" in table[2]
    assert table[3].startswith("| tiny: optimizer=muon | 3 |") and "| — |" in table[3]

    done = (runs / "0_adamw" / "report.md").read_text()
    assert done.startswith("# Run report: tiny (0_adamw)")
    assert (
        f"| parameters | {summary['params']:,} ({summary['params_non_embedding']:,} without" in done
    )
    assert "| overrides | `optimizer=adamw`" in done and "| git commit |" in done
    assert "## Evaluation" in done and "| eval.json | 3 | 100 | 5.5000 | 2.2500 |" in done
    assert "## Sample" in done and summary["sample"].strip() in done
    assert png_size(runs / "0_adamw" / "val_loss.png")
    unfinished = (runs / "1_muon" / "report.md").read_text()
    last_val = [r["val_loss"] for r in metrics(runs / "1_muon") if "val_loss" in r][-1]
    assert f"| final val loss | {last_val:.4f} nats/token |" in unfinished
    assert "| unigram entropy | — |" in unfinished and "## Sample" not in unfinished


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    from muongpt.cli import report as report_cli

    (tmp_path / "nothing").mkdir()
    rc = report_cli.main([str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert (
        rc == 2 and err.splitlines()[-1] == f"error: no run with metrics in {tmp_path / 'nothing'}"
    )
