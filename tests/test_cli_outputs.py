"""Every command that writes files refuses an output path it cannot write, in one line and
before its work: here a path whose folder is a regular file (each of these was a traceback
before 2026-12-05, after the work for `muongpt eval --json`)."""

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
