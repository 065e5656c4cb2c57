"""`muongpt eval`: loss and bits per byte against the model's own per-token losses, by hand."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.cli import evaluate as eval_cli
from muongpt.config import CONF_DIR, model_config, register_configs
from muongpt.data.shards import write_shard
from muongpt.data.tokenizer import EOT_TOKEN, encode
from muongpt.generate import load_model
from muongpt.model import build_model
from muongpt.train.checkpoint import save_checkpoint

# Real text (the opening of tiny Shakespeare) plus characters of 2, 3 and 4 UTF-8 bytes.
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "Crème brûlée — 東京 🙂!\n"
)
DOC2 = "Second Citizen:\nWe are accounted poor citizens, the patricians good.\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    register_configs()
    overrides = ["experiment=tiny", "model.n_layer=2", "model.n_head=2"]
    overrides += ["model.n_embd=32", "training.seq_len=64"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    torch.manual_seed(0)
    model = build_model(model_config(config["model"]))
    with torch.no_grad():  # fill the zero-initialised projections: token losses must differ
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("embed"):
                p.normal_(0, 1.0 / p.size(1) ** 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "step_000003.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "step": 3})
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0]


def window_nats(model, tokens: list[int], seq_len: int, keep=lambda t: True) -> float:
    """Total nats, window by window: -log p(target) from the model's logits over its vocabulary.

    Targets failing ``keep`` are left out. (The model's padded vocabulary rows are no tokens, so
    the probabilities are those the sampler draws from: a softmax over the real vocabulary.)
    """
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, seq_len):
            chunk = tokens[s : s + seq_len + 1]
            log_probs = torch.log_softmax(model(torch.tensor([chunk[:-1]]))[0].double(), dim=-1)
            total -= sum(log_probs[i, t].item() for i, t in enumerate(chunk[1:]) if keep(t))
    return total


def evaluate(argv, capsys):
    # on the CPU, as the by-hand references are (a GPU evaluates under bf16 autocast)
    rc = eval_cli.main([*argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bits_per_byte_of_a_text_file_by_hand(checkpoint, model, tmp_path, capsys):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    tokens = [EOT_TOKEN] + encode(TEXT)
    report_file = tmp_path / "report.json"
    argv = [str(checkpoint), "--data", str(text_file), "--json", str(report_file)]
    rc, out, _ = evaluate(argv + ["--seq-len", "256"], capsys)
    assert rc == 0 and "tiny.txt" in out and "bits/byte" in out
    got = json.loads(report_file.read_text())["files"][0]
    nats = window_nats(model, tokens, 256)  # one window holds the whole text
    n_bytes = len(TEXT.encode("utf-8"))
    assert got["tokens"] == len(tokens) - 1
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / (len(tokens) - 1), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    # The training loss (a softmax that also spans the vocabulary padding) is never lower.
    with torch.no_grad():
        train_loss = model(torch.tensor([tokens[:-1]]), torch.tensor([tokens[1:]])).item()
    assert got["loss"] <= train_loss + 1e-5
    assert got["loss"] == pytest.approx(train_loss, rel=1e-3)

    # Shorter windows: the context restarts every 16 tokens, and the last window is short.
    assert (len(tokens) - 1) % 16
    rc, _, _ = evaluate(argv + ["--seq-len", "16", "--batch-size", "3"], capsys)
    got = json.loads(report_file.read_text())["files"][0]
    nats = window_nats(model, tokens, 16)
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_shard_equals_text_and_end_of_text_has_no_bytes(checkpoint, model, tmp_path, capsys):
    text_file = tmp_path / "one.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    write_shard(tmp_path / "one.bin", [EOT_TOKEN] + encode(TEXT))
    two_docs = [EOT_TOKEN] + encode(TEXT) + [EOT_TOKEN] + encode(DOC2)
    write_shard(tmp_path / "two.bin", two_docs)
    data = [str(tmp_path / name) for name in ("one.txt", "one.bin", "two.bin")]
    rc, out, _ = evaluate(
        [str(checkpoint), "--data", *data, "--seq-len", "32", "--json", "-"], capsys
    )
    assert rc == 0
    report = json.loads(out)
    txt, bin_, two = report["files"]
    for key in ("tokens", "bytes", "loss", "bits_per_byte"):
        assert txt[key] == pytest.approx(bin_[key], rel=1e-6)
    # The separator in the middle of two.bin: predicted, in the loss, but no text and no bytes.
    all_nats = window_nats(model, two_docs, 32)
    text_nats = window_nats(model, two_docs, 32, keep=lambda t: t != EOT_TOKEN)
    n_bytes = len((TEXT + DOC2).encode("utf-8"))
    assert two["bytes"] == n_bytes
    assert two["text_tokens"] == len(two_docs) - 2
    assert two["loss"] == pytest.approx(all_nats / (len(two_docs) - 1), rel=1e-5)
    assert two["bits_per_byte"] == pytest.approx(text_nats / (math.log(2) * n_bytes), rel=1e-5)
    total = report["total"]
    assert total["tokens"] == sum(f["tokens"] for f in report["files"])
    assert total["bytes"] == sum(f["bytes"] for f in report["files"])


def test_max_tokens_caps_the_predicted_tokens(checkpoint, model, tmp_path, capsys):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    argv = [str(checkpoint), "--data", str(text_file), str(text_file), "--seq-len", "8"]
    rc, out, _ = evaluate(argv + ["--max-tokens", "20", "--json", "-"], capsys)
    assert rc == 0
    report = json.loads(out)
    tokens = [EOT_TOKEN] + encode(TEXT)
    assert [f["tokens"] for f in report["files"]] == [20]
    assert report["files"][0]["loss"] == pytest.approx(window_nats(model, tokens[:21], 8) / 20)


def test_real_text_bytes_are_the_file_size(checkpoint, shared_data, tmp_path, capsys):
    text = (shared_data / "small" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000]
    path = tmp_path / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    rc, out, _ = evaluate([str(checkpoint), "--data", str(path), "--json", "-"], capsys)
    assert rc == 0
    got = json.loads(out)["files"][0]
    assert got["bytes"] == path.stat().st_size
    assert got["tokens"] == len(encode(text))
    assert json.loads(out)["seq_len"] == 64  # the run's training.seq_len by default


def assert_clear_error(result, *words):
    rc, _, err = result
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_bad_inputs(checkpoint, tmp_path, capsys):
    text_file = tmp_path / "ok.txt"
    text_file.write_text(TEXT)
    missing = tmp_path / "missing.pt"
    assert_clear_error(evaluate([str(missing), "--data", str(text_file)], capsys), "not found")

    not_ckpt = tmp_path / "weights.pt"
    torch.save({"weights": torch.ones(3)}, not_ckpt)
    result = evaluate([str(not_ckpt), "--data", str(text_file)], capsys)
    assert_clear_error(result, "not a muongpt checkpoint")

    result = evaluate([str(checkpoint), "--data", str(tmp_path / "none.txt")], capsys)
    assert_clear_error(result, "none.txt", "not found")

    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    assert_clear_error(evaluate([str(checkpoint), "--data", str(binary)], capsys), "UTF-8")

    bad_shard = tmp_path / "bad.bin"
    bad_shard.write_bytes(np.arange(300, dtype=np.int32).tobytes())
    assert_clear_error(evaluate([str(checkpoint), "--data", str(bad_shard)], capsys), "bad.bin")

    packed = tmp_path / "val.bin.xz"
    packed.write_bytes(b"\xfd7zXZ\x00")
    assert_clear_error(evaluate([str(checkpoint), "--data", str(packed)], capsys), "unpack")

    argv = [str(checkpoint), "--data", str(text_file), "--seq-len", "0"]
    assert_clear_error(evaluate(argv, capsys), "--seq-len")


def test_output_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_text (reports, summaries, --json / --out files) writes a temporary file and renames
    it: a write that fails part-way leaves the previous file as it was, and nothing beside it."""
    from pathlib import Path

    from muongpt.cli import write_text

    path = write_text(tmp_path / "report.json", '{"loss": 1.0}\n', "--json")
    real = Path.write_text

    def torn(self, text, *args, **kwargs):  # half the text, then the disk fails
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(MuonGPTError, match=r"--json: cannot write .*report.json"):
        write_text(path, '{"loss": 2.0, "more": "text"}\n', "--json")
    assert path.read_text() == '{"loss": 1.0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_progress_bar_counts_batches_and_a_run_folder_is_accepted(
    checkpoint, model, tmp_path, capsys
):
    from muongpt.cli.evaluate import evaluate_tokens

    tokens = np.array([EOT_TOKEN] + encode(TEXT), dtype=np.int64)
    n_windows = -(-(len(tokens) - 1) // 8)  # ceil
    evaluate_tokens(model, tokens, 8, 1, name="tiny", progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rtiny:   0%|") and f"| 0/{n_windows} [" in err and "batch/s" in err
    evaluate_tokens(model, tokens, 8, 1, name="tiny")
    assert capsys.readouterr().err == ""  # off unless asked (the CLI: on a terminal only)

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run_dir / "checkpoints" / "step_000001.pt")
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    by_file = evaluate([str(checkpoint), "--data", str(text_file), "--json", "-"], capsys)
    by_folder = evaluate([str(run_dir), "--data", str(text_file), "--json", "-"], capsys)
    assert by_folder[0] == 0
    assert json.loads(by_folder[1])["total"] == json.loads(by_file[1])["total"]


def test_model_options_that_keep_the_weights_can_be_set(checkpoint, tmp_path, capsys):
    text_file = tmp_path / "ok.txt"
    text_file.write_text(TEXT)
    base = [str(checkpoint), "--data", str(text_file), "--json", "-"]
    rc, out, _ = evaluate(base, capsys)
    assert rc == 0
    plain = json.loads(out)["total"]["loss"]
    rc, out, _ = evaluate([*base, "--set", "model.logit_softcap=2.0"], capsys)
    assert rc == 0
    capped = json.loads(out)
    assert capped["overrides"] == ["model.logit_softcap=2.0"]
    capped_model = load_model(checkpoint, overrides=["model.logit_softcap=2.0"])[0]
    tokens = [EOT_TOKEN, *encode(TEXT)]
    expected = window_nats(capped_model, tokens, 64) / (len(tokens) - 1)
    assert capped["total"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert capped["total"]["loss"] != pytest.approx(plain, rel=1e-3)
    for bad, words in [
        ("model.n_layer=3", ("model.n_layer=3", "change the weights")),
        ("model.no_such_option=1", ("no_such_option",)),
        ("training.seq_len=8", ("model.KEY=VALUE",)),
    ]:
        assert_clear_error(evaluate([*base, "--set", bad], capsys), *words)
