"""HellaSwag scoring: the batched scorer equals a per-example brute force, a model taught an
ending picks it, bad input is named by line, long contexts are cut from the left once."""

import json

import pytest
import torch
import torch.nn.functional as F

from muongpt import MuonGPTError
from muongpt.cli import evaluate as eval_cli
from muongpt.data.tokenizer import EOT_TOKEN, encode
from muongpt.evals import hellaswag
from muongpt.evals.hellaswag import Example
from muongpt.train.checkpoint import save_checkpoint
from test_sample import random_model, run_config

EXAMPLES = [
    Example("The cat sat on the", ["mat.", "moon, singing loudly all night", "a", "dog"], 0),
    Example("To be, or not to be:", ["that is the question.", "no", "maybe so", "eh"], 0),
    Example("He opened the door and", ["walked in.", "flew", "sat down on a chair", "x y z"], 2),
]


def brute_force(model, example: Example) -> list[float]:
    """Each ending alone, whole sequence at once: sum of log p over the ending's tokens."""
    context = [EOT_TOKEN] + encode(example.ctx)
    sums = []
    for ending in example.endings:
        tokens = encode(" " + ending)
        ids = torch.tensor([context + tokens])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1]).double(), -1)[0]
        sums.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(tokens)))
    return sums


def test_batched_scores_equal_brute_force(single_thread):
    model = random_model(run_config(), seed=3)
    scores = hellaswag.score(model, EXAMPLES, window=128, batch_size=5, progress=False)
    for example, s in zip(EXAMPLES, scores):
        assert s.logprob == pytest.approx(brute_force(model, example), abs=1e-4)
        assert s.chars == [len(e) for e in example.endings]
    result = hellaswag.accuracies(scores)
    picks = []
    for e in EXAMPLES:
        sums = brute_force(model, e)
        picks.append(max(range(4), key=lambda i: sums[i] / len(e.endings[i])))
    assert result["accuracy"] == sum(p == e.label for p, e in zip(picks, EXAMPLES)) / 3
    assert result["n"] == 3


def test_a_model_taught_an_ending_picks_it(single_thread):
    torch.manual_seed(0)
    model = random_model(run_config(), seed=1).train()
    # The right endings are label 0 for the first two and 2 for the third: teach those.
    texts = [[EOT_TOKEN] + encode(e.ctx + " " + e.endings[e.label]) for e in EXAMPLES]
    ids = torch.full((len(texts), max(map(len, texts))), -1)
    for i, seq in enumerate(texts):
        ids[i, : len(seq)] = torch.tensor(seq)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):  # one batch of the three right answers
        loss = model(ids[:, :-1].clamp(min=0), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = hellaswag.score(model.eval(), EXAMPLES, window=128, progress=False)
    assert hellaswag.accuracies(scores)["accuracy_raw"] == 1.0
    assert hellaswag.accuracies(scores)["accuracy"] == 1.0


def test_accuracy_is_normalized_by_characters_raw_is_the_plain_sum():
    # Sums -10 and -6 over endings of 20 and 5 characters, 2 and 3 tokens.
    s = hellaswag.Scores(logprob=[-10.0, -6.0], chars=[20, 5], tokens=[2, 3], label=0)
    assert (s.pick("none"), s.pick("chars"), s.pick("tokens")) == (1, 0, 1)
    result = hellaswag.accuracies([s])
    assert (result["accuracy"], result["accuracy_raw"], result["accuracy_token_norm"]) == (1, 0, 0)


def test_ending_longer_than_the_window_scores_its_last_tokens():
    model = random_model(run_config(), seed=3)
    example = Example("The cat", ["moon, singing loudly all night long", "no"], 0)
    cut = hellaswag.score(model, [example], 4, progress=False, warn=lambda m: None)
    seq = ([EOT_TOKEN] + encode(example.ctx) + encode(" " + example.endings[0]))[-5:]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]])).double(), -1)[0]
    assert cut[0].logprob[0] == pytest.approx(sum(float(logp[j, seq[j + 1]]) for j in range(4)))


def test_long_context_is_cut_from_the_left_and_said_once():
    model = random_model(run_config(), seed=3)
    long = Example("word " * 60 + "The cat sat on the", EXAMPLES[0].endings, 0)
    messages = []
    cut = hellaswag.score(model, [long, long], 16, progress=False, warn=messages.append)
    assert len(messages) == 1 and "2 of 2 examples" in messages[0]
    # Equal to scoring the last 17 tokens of each sequence by hand.
    context = [EOT_TOKEN] + encode(long.ctx)
    for ending, value in zip(long.endings, cut[0].logprob):
        seq = (context + encode(" " + ending))[-17:]
        n = len(encode(" " + ending))
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[:-1]])).double(), -1)[0]
        expected = sum(float(logp[16 - n + j, t]) for j, t in enumerate(seq[-n:]))
        assert value == pytest.approx(expected, abs=1e-4)


def test_malformed_line_is_named_by_number(tmp_path):
    good = json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 1})
    path = tmp_path / "hs.jsonl"
    path.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(MuonGPTError, match=r"hs.jsonl:4: not JSON"):
        hellaswag.read_examples(path)
    path.write_text(good + "\n" + json.dumps({"ctx": "a", "endings": ["b"], "label": 0}) + "\n")
    with pytest.raises(MuonGPTError, match=r"hs.jsonl:2: 'endings'"):
        hellaswag.read_examples(path)
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2}) + "\n")
    with pytest.raises(MuonGPTError, match=r"hs.jsonl:1: 'label'"):
        hellaswag.read_examples(path)
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": "1"}) + "\n")
    assert hellaswag.read_examples(path)[0].label == 1  # the Hugging Face copy's string labels


@pytest.fixture
def checkpoint(tmp_path):
    config = run_config()
    path = tmp_path / "step_000003.pt"
    save_checkpoint(path, {"model": random_model(config).state_dict(), "config": config})
    return path


def test_cli_writes_result_json(checkpoint, tmp_path, capsys):
    data = tmp_path / "hs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"ctx": e.ctx, "endings": e.endings, "label": e.label}) + "\n"
            for e in EXAMPLES
        )
    )
    out = tmp_path / "result.json"
    argv = [str(checkpoint), "--task", "hellaswag", "--data", str(data), "--out", str(out)]
    assert eval_cli.main([*argv, "--no-progress", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_raw"] <= 1
    assert "accuracy" in capsys.readouterr().out


def test_unknown_task_and_offline_download_are_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    assert eval_cli.main([str(checkpoint), "--task", "mmlu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task" in err

    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert eval_cli.main([str(checkpoint), "--task", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline?" in err and "--data" in err


@pytest.mark.parametrize("kind", ["text", "foreign_safetensors", "torch_tensor"])
def test_a_checkpoint_of_another_format_is_one_line(kind, tmp_path, capsys):
    data = tmp_path / "hs.jsonl"
    data.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    if kind == "text":
        path = tmp_path / "step_000001.pt"
        path.write_text("not a checkpoint")
    elif kind == "foreign_safetensors":  # e.g. a Hugging Face model's weights: no muongpt config
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({"wte.weight": torch.zeros(4, 2)}, str(path))
    else:
        path = tmp_path / "weights.pt"
        torch.save(torch.zeros(3), path)
    argv = [str(path), "--task", "hellaswag", "--data", str(data), "--no-progress"]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "not a muongpt" in err


def test_shakespeare_mc_builder_uses_only_held_out_text_and_is_reproducible():
    import importlib.util

    from muongpt.assets import TINY_SHAKESPEARE

    path = hellaswag.Path(__file__).resolve().parents[1] / "benchmarks" / "shakespeare_mc.py"
    spec = importlib.util.spec_from_file_location("shakespeare_mc", path)
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    examples = mc.build(40, seed=1)
    assert examples == mc.build(40, seed=1) and len(examples) == 40
    text = TINY_SHAKESPEARE.read_text()
    tail = mc.held_out_text()
    assert text.endswith(tail) and len(tail) < 0.11 * len(text)
    for e in examples:
        parsed = hellaswag.parse_example(json.dumps(e), "built")
        right = parsed.ctx + " " + parsed.endings[parsed.label]
        assert right in tail  # the true continuation, verbatim
        assert sum(parsed.ctx + " " + x in tail for x in parsed.endings) == 1
