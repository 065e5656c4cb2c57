"""Every command that writes files refuses an output path it cannot write, in one line and
before its work: a path whose folder is a regular file, or a file name that is a folder (each of
these was a traceback before 2026-12-05, some after the work, as `muongpt eval --json`)."""

import json

import pytest

from muongpt.cli import main as main_cli
from muongpt.train.checkpoint import save_checkpoint
from test_sample import random_model, run_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = run_config()
    path = tmp_path_factory.mktemp("run") / "step_000001.pt"
    save_checkpoint(path, {"model": random_model(config).state_dict(), "config": config, "step": 1})
    return path


@pytest.mark.parametrize(
    "command, what",
    [
        ("export hf {ckpt} {blocked}/hf", "OUT_DIR"),
        ("export safetensors {ckpt} {blocked}/w.safetensors", "OUT"),
        ("data tokenize {text} --out {blocked}/shards", "--out"),
        ("data fineweb --out {blocked}/fineweb", "--out"),
        ("eval {ckpt} --data {text} --json {blocked}/r.json", "--json"),
        ("eval {ckpt} --task hellaswag --data {text} --out {blocked}/r.json", "--out"),
    ],
)
def test_an_output_under_a_file_is_one_line_before_the_work(
    command, what, checkpoint, tmp_path, capsys
):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    text = tmp_path / "notes.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    argv = command.format(ckpt=checkpoint, blocked=blocked, text=text).split()
    assert main_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {what}: cannot create folder") and err.count("\n") == 1, err
    assert "a_file is a file, not a folder" in err
    assert out == ""  # nothing was computed or written before the refusal
    assert blocked.read_text() == "not a folder"


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as far as plot and report read one: its metrics."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "val_loss": 10.9}, {"step": 4, "train_loss": 7.5, "val_loss": 7.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.mark.parametrize(
    "command, what",
    [
        ("eval {ckpt} --data {text} --json {folder}", "--json"),
        ("eval {ckpt} --task hellaswag --data {text} --out {folder}", "--out"),
        ("export safetensors {ckpt} {folder}", "OUT"),
        ("plot {run} --table {folder}", "--table"),
        ("report {run} --table {folder}", "--table"),
        ("bench bench.out={folder}", "bench.out"),
    ],
)
def test_a_file_name_that_is_a_folder_is_one_line_before_the_work(
    command, what, checkpoint, run_dir, tmp_path, capsys
):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    argv = command.format(ckpt=checkpoint, folder=folder, text=text, run=run_dir).split()
    assert main_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {what}: {folder} is a folder; give a file name\n"
    assert out == "" and list(folder.iterdir()) == []
    assert not (run_dir / "report.md").exists()  # report refused before writing any


def test_an_export_folder_that_is_a_file_is_one_line(checkpoint, tmp_path, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    assert main_cli.main(["export", "hf", str(checkpoint), str(blocked), "--force"]) == 2
    assert capsys.readouterr().err == (
        f"error: {blocked} is a file, not a folder; choose another OUT_DIR\n"
    )
    assert blocked.read_text() == "not a folder"


def test_a_plot_named_without_a_suffix_is_a_png_and_says_so(run_dir, tmp_path, capsys):
    (tmp_path / "loss").mkdir()  # a folder of that name is no obstacle: the file is loss.png
    assert main_cli.main(["plot", str(run_dir), "--out", str(tmp_path / "loss")]) == 0
    assert capsys.readouterr().err.strip() == f"plot: {tmp_path / 'loss.png'}"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
