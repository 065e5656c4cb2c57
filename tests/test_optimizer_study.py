"""benchmarks/optimizer_study.py without training: its sweep, finals and outputs on fake runs."""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_study.py"


@pytest.fixture(scope="module")
def study_module():
    spec = importlib.util.spec_from_file_location("optimizer_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_args(out, **kw):
    args = dict(
        preset="tiny",
        out=str(out),
        train_files=None,
        val_files=None,
        factors=[0.5, 1, 2, 4],
        max_extend=2,
        seeds=2,
        seed=1337,
        reuse_sweep=False,
        parallel=1,
        final_parallel=1,
        override=[],
    )
    return SimpleNamespace(**{**args, **kw})


def test_sweep_grows_to_an_interior_best_then_finals_table_and_plots(
    study_module, tmp_path, monkeypatch
):
    s = study_module
    calls = []

    def fake_run(self, opt, lr, seed, threads):
        calls.append((opt.name, lr, seed))
        best = 8 * opt.default_lr  # past the grid's top: it grows twice
        loss = 3 + math.log(lr / best) ** 2 + (0.01 if seed % 2 else 0)
        if lr > 12 * opt.default_lr:
            return {"val_loss": math.inf, "failed": 1, "error": "non-finite loss at step 3"}
        curve = [[0, 0, 0.0, 11.0], [10, 10240, 1.5, loss]]
        return dict(
            val_loss=loss,
            train_seconds=seed - 1336.0,
            step_ms=150.0,
            state_bytes=2**29,
            curve=curve,
        )

    monkeypatch.setattr(s.Study, "run", fake_run)
    study = s.Study(fake_args(tmp_path))
    muon = s.OPTIMIZERS["muon"]
    best = study.sweep([muon])["muon"]
    assert best == pytest.approx(8 * muon.default_lr)
    assert study.data["grid"]["muon"] == pytest.approx(
        [muon.default_lr * f for f in (0.5, 1, 2, 4, 8, 16)]
    )
    study.finals(muon, best)
    assert [c[2] for c in calls[-2:]] == [1338, 1339]
    n_calls = len(calls)
    study.sweep([muon])  # resumed: nothing runs again
    assert len(calls) == n_calls
    study.data["seed"] = 1337
    text = s.table(study.data)
    assert (
        "| Muon |" in text
        and "| 0.4 |" in text
        and "16 (diverged)" not in text
        and "0.8 (diverged)" in text
        and "3.0050 ± 0.0050" in text
        and "0.500" in text
    )
    s.plots(study.data, tmp_path)
    assert (tmp_path / "val_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "val_vs_time.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["best_lr"]["muon"] == pytest.approx(best)


def test_a_preset_with_data_needs_the_files(study_module, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["x", "--preset", "d12", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        study_module.main()
    assert exit_info.value.code != 0
    assert "--train-files" in capsys.readouterr().err


def test_reuse_sweep_counts_its_loss_not_its_time(study_module, tmp_path, monkeypatch):
    s = study_module

    def fake_run(self, opt, lr, seed, threads):
        loss = 3 + abs(math.log(lr / opt.default_lr)) + (0.01 if seed == 1337 else 0)
        curve = [[10, 10240, 1.5, loss]]
        return dict(
            val_loss=loss, train_seconds=seed - 1336.0, step_ms=1.0, state_bytes=1, curve=curve
        )

    monkeypatch.setattr(s.Study, "run", fake_run)
    study = s.Study(fake_args(tmp_path, reuse_sweep=True))
    adamw = s.OPTIMIZERS["adamw"]
    study.finals(adamw, study.sweep([adamw])["adamw"])
    assert study.data["final_seeds"]["adamw"] == [1337, 1338]
    assert study.data["timed_seeds"]["adamw"] == [1338]
    study.data["seed"] = 1337
    row = next(line for line in s.table(study.data).splitlines() if line.startswith("| AdamW"))
    assert "3.0050 ± 0.0050" in row and "| 2.0 |" in row  # the loss of both, the time of one


def test_every_grid_runs_in_one_pool_and_only_edges_grow(study_module, tmp_path, monkeypatch):
    s = study_module
    batches = []

    def fake_run(self, opt, lr, seed, threads):
        best = (8 if opt.name == "muon" else 1) * opt.default_lr  # Muon's best past the grid
        return dict(val_loss=3 + math.log(lr / best) ** 2, train_seconds=1.0, step_ms=1.0)

    real_record_all = s.Study.record_all

    def spy(self, jobs, parallel):
        batches.append(sorted({(job[0].name) for job in jobs}))
        real_record_all(self, jobs, parallel)

    monkeypatch.setattr(s.Study, "run", fake_run)
    monkeypatch.setattr(s.Study, "record_all", spy)
    study = s.Study(fake_args(tmp_path, parallel=4))
    best = study.sweep([s.OPTIMIZERS["muon"], s.OPTIMIZERS["adamw"]])
    assert batches == [["adamw", "muon"], ["muon"], ["muon"]]
    assert best["adamw"] == pytest.approx(s.OPTIMIZERS["adamw"].default_lr)
    assert best["muon"] == pytest.approx(8 * s.OPTIMIZERS["muon"].default_lr)
    assert len(study.data["grid"]["adamw"]) == 4 and len(study.data["grid"]["muon"]) == 6


def test_a_crashed_run_is_run_again_a_diverged_one_is_not(study_module, tmp_path, monkeypatch):
    s = study_module
    calls = []

    def fake_run(self, opt, lr, seed, threads):
        calls.append(lr)
        if lr == opt.default_lr * 4:
            return {"val_loss": math.inf, "failed": 1, "error": "non-finite loss at step 3"}
        if lr == opt.default_lr and calls.count(lr) == 1:
            return {"val_loss": math.inf, "failed": 1, "error": "CUDA out of memory"}
        return dict(val_loss=3 + abs(math.log(lr / opt.default_lr)), train_seconds=1.0)

    monkeypatch.setattr(s.Study, "run", fake_run)
    muon = s.OPTIMIZERS["muon"]
    s.Study(fake_args(tmp_path, max_extend=0)).sweep([muon])
    study = s.Study(fake_args(tmp_path, max_extend=0))  # the study run again
    assert study.sweep([muon])["muon"] == pytest.approx(muon.default_lr)
    assert sorted(calls) == sorted([muon.default_lr * f for f in (0.5, 1, 1, 2, 4)])


def test_fitted_lr_is_the_vertex_in_log_lr_and_none_at_an_edge(study_module):
    s = study_module
    best = 0.00071
    losses = {
        0.00075 * 2 ** (k / 2): 5.8 + 0.3 * (k / 2 - math.log2(best / 0.00075)) ** 2
        for k in range(-2, 3)
    }
    assert s.fitted_lr(losses) == pytest.approx(best, rel=1e-9)
    # the minimum at the grid's edge is not bracketed: no vertex
    assert s.fitted_lr({lr: lr for lr in (1e-4, 2e-4, 4e-4)}) is None
    assert s.fitted_lr({lr: -lr for lr in (1e-4, 2e-4, 4e-4)}) is None
