"""Sampling: seeded determinism, cached decoding == full recomputation, streaming, the CLI."""

import io
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.cli import sample as sample_cli
from muongpt.config import CONF_DIR, model_config, register_configs
from muongpt.data.tokenizer import EOT_TOKEN, decode, encode, get_tokenizer
from muongpt.generate import TextStreamer, filter_logits, generate_tokens, load_model
from muongpt.model import build_model
from muongpt.model.gpt import GPT
from muongpt.train.checkpoint import save_checkpoint

MIXINGS = {"attention": "self_attention", "pom": "pom", "hybrid": "hybrid"}


def run_config(mixing: str = "self_attention") -> dict:
    """The real composed config of a tiny experiment, shrunk to a 3-layer, 32-wide model."""
    register_configs()
    overrides = ["experiment=tiny", f"mixing_layer={mixing}", "model.n_layer=3"]
    overrides += ["model.n_head=2", "model.n_embd=32"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def random_model(config: dict, dtype=torch.float32, seed: int = 0) -> GPT:
    """A model with its zero-initialised projections filled in: the logits depend on the input."""
    torch.manual_seed(seed)
    model = build_model(model_config(config["model"])).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("embed"):
                p.normal_(0, 0.3 / p.size(1) ** 0.5 * (4 if name.startswith("lm_head") else 1))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = run_config()
    model = random_model(config)
    path = tmp_path_factory.mktemp("ckpt") / "step_000007.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "step": 7})
    return path


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = random_model(run_config())
    prompt = [EOT_TOKEN] + encode("The king")
    draw = lambda seed: list(generate_tokens(model, prompt, 24, temperature=1.0, seed=seed))
    first = draw(1234)
    assert len(first) == 24
    assert draw(1234) == first
    assert draw(4321) != first


@pytest.mark.parametrize("mixer", ["attention", "pom", "hybrid"])
def test_cached_decoding_equals_full_recomputation(mixer):
    model = random_model(run_config(MIXINGS[mixer]), dtype=torch.float64)
    prompt = [EOT_TOKEN] + encode("To be, or not to be")
    # Logits: the prompt at once, then one token at a time, against one pass over everything.
    seq = torch.tensor([prompt + encode(" that is the question")])
    caches = model.new_caches(1, seq.size(1))
    n = len(prompt)
    with torch.no_grad():
        stepwise = [model(seq[:, :n], caches=caches)]
        stepwise += [model(seq[:, t : t + 1], caches=caches) for t in range(n, seq.size(1))]
        full = model(seq)
    torch.testing.assert_close(torch.cat(stepwise, dim=1), full, rtol=1e-9, atol=1e-9)
    # Tokens: greedy and seeded sampling agree with and without the cache.
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 40, "seed": 3}):
        cached = list(generate_tokens(model, prompt, 16, use_cache=True, **kwargs))
        uncached = list(generate_tokens(model, prompt, 16, use_cache=False, **kwargs))
        assert cached == uncached


def test_filter_logits_matches_a_sorted_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, dtype=torch.float64)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 1.0)]:
        kept = torch.isfinite(filter_logits(logits, top_k, top_p))
        for row, keep in zip(logits, kept):
            order = sorted(range(50), key=lambda i: -row[i].item())
            if top_k:
                order = order[:top_k]
            probs = torch.softmax(row[order], dim=0).tolist()
            expected, mass = set(), 0.0
            for i, p in zip(order, probs):  # the smallest prefix whose mass reaches top_p
                expected.add(i)
                mass += p
                if mass >= top_p:
                    break
            assert set(torch.nonzero(keep).flatten().tolist()) == expected


def test_text_streamer_never_emits_half_a_character():
    text = "naïve café — 日本語のテキスト 🙂🎉 done"
    tokens = encode(text)
    token_bytes = [get_tokenizer().decode_single_token_bytes(t) for t in tokens]

    def valid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(valid(b) for b in token_bytes), "the text should split a character"
    streamer = TextStreamer()
    pieces = [streamer.push(t) for t in tokens] + [streamer.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_sampling_arguments():
    model = random_model(run_config())
    with pytest.raises(MuonGPTError, match="empty prompt"):
        list(generate_tokens(model, [], 4))
    for kwargs in ({"top_p": 0.0}, {"top_k": -1}, {"temperature": -1.0}):
        with pytest.raises(MuonGPTError):
            list(generate_tokens(model, [EOT_TOKEN], 4, **kwargs))


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = sample_cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_streams_the_greedy_continuation(checkpoint, capsys):
    rc, out, _ = run_cli(
        [str(checkpoint), "Hello", "--temperature", "0", "--max-new-tokens", "12"], capsys
    )
    assert rc == 0
    model, state = load_model(checkpoint)
    assert state["step"] == 7
    expected = decode(generate_tokens(model, [EOT_TOKEN] + encode("Hello"), 12, temperature=0))
    assert out == "Hello" + expected + "\n"


def test_cli_seeded_is_reproducible_and_reads_stdin(checkpoint, capsys, monkeypatch):
    argv = [str(checkpoint), "-", "--seed", "5", "--max-new-tokens", "10", "--device", "cpu"]
    rc1, out1, _ = run_cli(argv, capsys, stdin="Once upon", monkeypatch=monkeypatch)
    rc2, out2, _ = run_cli(argv, capsys, stdin="Once upon", monkeypatch=monkeypatch)
    assert rc1 == rc2 == 0
    assert out1 == out2
    assert out1.startswith("Once upon")
    model, _ = load_model(checkpoint)
    prompt = [EOT_TOKEN] + encode("Once upon")
    new = generate_tokens(model, prompt, 10, temperature=0.8, top_k=50, seed=5)
    assert out1 == "Once upon" + decode(new) + "\n"


def assert_clear_error(rc, err, *words):
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_cli_bad_inputs(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert_clear_error(*run_cli([str(missing), "hi"], capsys)[::2], "not found", str(missing))

    text_file = tmp_path / "notes.pt"
    text_file.write_text("this is not a checkpoint\n")
    assert_clear_error(*run_cli([str(text_file), "hi"], capsys)[::2], str(text_file))

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert_clear_error(*run_cli([str(foreign), "hi"], capsys)[::2], "not a muongpt checkpoint")

    no_model_config = tmp_path / "odd.pt"
    torch.save({"model": {}, "config": {"training": {}}}, no_model_config)
    assert_clear_error(*run_cli([str(no_model_config), "hi"], capsys)[::2], "not a muongpt")

    rc, _, err = run_cli([str(checkpoint), "", "--no-bos"], capsys)
    assert_clear_error(rc, err, "empty prompt")


def test_weights_only_export_samples_like_the_checkpoint(checkpoint, capsys):
    from muongpt.train.checkpoint import export_checkpoint

    export = export_checkpoint(checkpoint)
    a, _ = load_model(checkpoint)
    b, meta = load_model(export)
    assert meta["step"] == 7
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    args = ["To be", "--max-new-tokens", "12", "--seed", "3"]
    outputs = [run_cli([str(path), *args], capsys)[1] for path in (checkpoint, export)]
    assert outputs[0] == outputs[1] and outputs[0].startswith("To be")


def test_cli_accepts_a_run_folder_and_takes_its_newest_checkpoint(checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    state = torch.load(checkpoint, weights_only=False)
    save_checkpoint(run_dir / "checkpoints" / "step_000003.pt", {**state, "step": 3})
    save_checkpoint(run_dir / "checkpoints" / "step_000007.pt", state)
    assert sample_cli.model_file(run_dir).name == "step_000007.pt"
    args = ["To be", "--max-new-tokens", "6", "--seed", "3"]
    from_folder = run_cli([str(run_dir), *args], capsys)
    from_file = run_cli([str(checkpoint), *args], capsys)
    assert from_folder[0] == 0 and from_folder[1] == from_file[1]

    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert_clear_error(*run_cli([str(empty), "hi"], capsys)[::2], "no checkpoint in it", str(empty))


def test_interactive_loop_streams_each_prompt_and_ends_cleanly(checkpoint, capsys, monkeypatch):
    args = ["--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    model, _ = load_model(checkpoint)
    expect = lambda p: p + decode(generate_tokens(model, [EOT_TOKEN] + encode(p), 5, temperature=0))
    # two prompts, then an empty line: the loop stops there (the third prompt is never read)
    rc, out, err = run_cli(
        [str(checkpoint), "-i", *args],
        capsys,
        stdin="Hello\nThe king\n\nnever\n",
        monkeypatch=monkeypatch,
    )
    assert rc == 0
    assert out == "> " + expect("Hello") + "\n> " + expect("The king") + "\n> "
    assert "an empty line or Ctrl-D quits" in err and "error" not in err
    # end of input (Ctrl-D) after one prompt: a clean exit too
    rc, out, _ = run_cli(
        [str(checkpoint), "-i", *args], capsys, stdin="Hello\n", monkeypatch=monkeypatch
    )
    assert rc == 0 and out == "> " + expect("Hello") + "\n> "
    assert_clear_error(*run_cli([str(checkpoint), "hi", "-i"], capsys)[::2], "-i reads prompts")
