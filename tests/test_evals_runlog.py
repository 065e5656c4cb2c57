"""Evaluation results of a run: `muongpt eval` appends them to RUN/evals.jsonl without touching the
trainer's metrics.jsonl; `muongpt report` and `muongpt plot` show them."""

import json
import math

import pytest

from muongpt.cli import evaluate as eval_cli
from muongpt.cli import plot as plot_cli
from muongpt.cli import report as report_cli
from muongpt.evals import runlog
from muongpt.train.checkpoint import export_checkpoint, save_checkpoint
from muongpt.train.resilience import truncate_metrics
from test_hellaswag import EXAMPLES
from test_sample import random_model, run_config

METRICS = [
    {"step": 0, "val_loss": 10.8},
    {"step": 3, "tokens": 96, "train_loss": 9.0, "elapsed_s": 1.0},
    {"step": 5, "tokens": 160, "train_loss": 8.0, "elapsed_s": 2.0, "val_loss": 8.5},
]


@pytest.fixture(scope="module")
def models():
    config = run_config()
    return config, {step: random_model(config, seed=seed) for step, seed in ((3, 0), (5, 1))}


@pytest.fixture
def run_dir(models, tmp_path):
    """A run folder as the trainer leaves it: metrics.jsonl, config.yaml, checkpoints of steps 3
    and 5 (different weights), and data in HellaSwag's format."""
    from omegaconf import OmegaConf

    config, by_step = models
    run = tmp_path / "run"
    for step, model in by_step.items():
        path = run / "checkpoints" / f"step_{step:06d}.pt"
        state = {"model": model.state_dict(), "config": config, "step": step}
        save_checkpoint(path, {**state, "tokens_seen": 32 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    data = tmp_path / "mc.jsonl"
    rows = [{"ctx": e.ctx, "endings": e.endings, "label": e.label} for e in EXAMPLES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, data


def evaluate(target, data, *extra):
    argv = [str(target), "--task", "hellaswag", "--data", str(data), "--no-progress", *extra]
    assert eval_cli.main([*argv, "--device", "cpu"]) == 0


def test_eval_of_a_run_appends_to_evals_jsonl_and_leaves_metrics_alone(run_dir, tmp_path):
    run, data = run_dir
    before = (run / "metrics.jsonl").read_bytes()
    evaluate(run / "checkpoints" / "step_000003.pt", data, "--out", str(tmp_path / "a.json"))
    evaluate(run, data, "--out", str(tmp_path / "b.json"))  # a run folder: its newest checkpoint
    assert (run / "metrics.jsonl").read_bytes() == before
    records = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"], r["checkpoint"]) for r in records] == [
        (3, 96, "checkpoints/step_000003.pt"),
        (5, 160, "checkpoints/step_000005.pt"),
    ]
    for r, name in zip(records, ("a.json", "b.json")):
        result = json.loads((tmp_path / name).read_text())
        assert r["eval/hellaswag"] == result["accuracy"]
        assert r["eval/hellaswag_raw"] == result["accuracy_raw"] and r["n"] == 3
    # A resume from step 3 rewrites metrics.jsonl; the evaluation of step 5 stays recorded.
    assert truncate_metrics(run / "metrics.jsonl", 3) == 1
    assert len(runlog.read_evals(run)) == 2


def test_name_no_record_and_checkpoints_outside_a_run(run_dir, tmp_path):
    run, data = run_dir
    evaluate(run, data, "--name", "shakespeare_mc")
    assert set(runlog.figures(runlog.read_evals(run)[0])) == {
        "eval/shakespeare_mc",
        "eval/shakespeare_mc_raw",
    }
    evaluate(run, data, "--no-record")
    assert len(runlog.read_evals(run)) == 1
    loose = export_checkpoint(
        run / "checkpoints" / "step_000005.pt", tmp_path / "model.safetensors"
    )
    evaluate(loose, data)  # no run folder around it: nothing to record into
    assert not (tmp_path / "evals.jsonl").exists()
    export = export_checkpoint(run / "checkpoints" / "step_000005.pt")  # inside the run
    evaluate(export, data)
    assert runlog.read_evals(run)[-1]["tokens"] == 160  # the export keeps the token count


def test_append_is_strict_json_and_keeps_a_torn_line_apart(tmp_path):
    path = tmp_path / runlog.EVALS
    path.write_text('{"step": 1, "eval/x": 0.5}\n{"step": 2, "ev')  # a writer killed mid-line
    runlog.append_eval(tmp_path, {"step": 3, "eval/x": math.nan, "eval/y": 0.25})
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"step": 1, "eval/x": 0.5}', '{"step": 2, "ev']
    assert json.loads(lines[2]) == {"step": 3, "eval/x": None, "eval/y": 0.25}
    records = runlog.read_evals(tmp_path)
    assert [r["step"] for r in records] == [1, 3]
    assert runlog.latest(records) == {"eval/x": 0.5, "eval/y": 0.25}  # null is no figure


def test_unwritable_run_folder_is_one_line(run_dir, tmp_path, capsys):
    run, data = run_dir
    (run / "evals.jsonl").mkdir()  # in the way of the file
    argv = [str(run), "--task", "hellaswag", "--data", str(data), "--no-progress"]
    assert eval_cli.main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot record the result" in err and "--no-record" in err
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 3  # the result is not lost


def test_an_unwritable_out_path_is_refused_before_the_evaluation(run_dir, tmp_path, capsys):
    run, data = run_dir
    (tmp_path / "file").write_text("")
    argv = [str(run), "--task", "hellaswag", "--data", str(data), "--no-progress"]
    assert eval_cli.main([*argv, "--out", str(tmp_path / "file" / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "--out" in err and "is a file, not a folder" in err
    assert "accuracy" not in out and runlog.read_evals(run) == []  # nothing was evaluated


def test_report_and_plot_show_the_evaluations(run_dir, tmp_path, capsys):
    run, data = run_dir
    evaluate(run / "checkpoints" / "step_000003.pt", data)
    evaluate(run, data)
    first, last = runlog.read_evals(run)
    report = report_cli.write_report(run).read_text()
    assert "## Downstream evaluation" in report
    row = f"| 5 | checkpoints/step_000005.pt | eval/hellaswag | {last['eval/hellaswag']:.4f} | 3 |"
    assert row in report
    table = report_cli.compare_table([run]).splitlines()
    assert table[0].endswith("| eval/hellaswag | eval/hellaswag_raw |")
    assert table[2].endswith(f"| {last['eval/hellaswag']:.4f} | {last['eval/hellaswag_raw']:.4f} |")

    capsys.readouterr()
    out = tmp_path / "hs.png"
    assert plot_cli.main([str(run), "--metric", "eval/hellaswag", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out.splitlines()
    assert "| eval/hellaswag | eval/hellaswag_raw |" in printed[0]
    assert printed[2].endswith(
        f"| {last['eval/hellaswag']:.4f} | {last['eval/hellaswag_raw']:.4f} |"
    )
    loaded = plot_cli.load_run(run)
    assert loaded.metric_series("eval/hellaswag") == (
        [3, 5],
        [first["eval/hellaswag"], last["eval/hellaswag"]],
    )
    assert loaded.metric_series("val_loss") == ([0, 5], [10.8, 8.5])  # metrics.jsonl's keys too


def test_plot_of_an_unknown_metric_is_one_line(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert plot_cli.main([str(run), "--metric", "eval/mmlu", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metric eval/mmlu: no run logged it" in err
    assert "val_loss" in err and not (tmp_path / "x.png").exists()
