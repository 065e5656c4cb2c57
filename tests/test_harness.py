"""The lm-evaluation-harness requests answered by muongpt: log-likelihoods equal muongpt's own
loss on the same text; greedy flags and generation agree with muongpt's greedy decoding."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from muongpt.assets import TINY_SHAKESPEARE
from muongpt.cli.evaluate import evaluate_tokens
from muongpt.data.tokenizer import EOT_TOKEN, decode, encode
from muongpt.evals.harness import Scorer
from muongpt.generate import generate_tokens
from test_sample import random_model, run_config


@pytest.fixture(scope="module")
def model():
    return random_model(run_config(), seed=5)


def nats(model, ids: torch.Tensor, first: int) -> float:
    """muongpt's cross-entropy (as `muongpt eval` computes it) summed over tokens first.. of ids."""
    with torch.no_grad():
        logits = model(ids[:, :-1])[0, first - 1 :]
    return float(F.cross_entropy(logits, ids[0, first:], reduction="sum"))


def text_with_targets(multiple: int) -> str:
    """A Shakespeare prefix whose [end-of-text] + tokens predict a multiple of ``multiple``."""
    words = TINY_SHAKESPEARE.read_text()[:3000].split(" ")
    for k in range(len(words), 0, -1):
        text = " ".join(words[:k])
        if len(encode(text)) % multiple == 0:
            return text
    raise AssertionError("no such prefix")


def test_rolling_loglikelihood_equals_muongpts_loss(model, single_thread):
    text = text_with_targets(16)
    tokens = np.array([EOT_TOKEN] + encode(text))
    ours = evaluate_tokens(model, tokens, seq_len=16, batch_size=8)  # muongpt eval's windows
    rolling = Scorer(model, window=16, batch_size=8).loglikelihood_rolling([text, "To be"])
    assert ours.tokens > 16 * 10
    assert rolling[0] == pytest.approx(-ours.nats, rel=1e-6)
    # One window: the whole text, muongpt's mean loss times the predicted tokens.
    ids = torch.tensor([[EOT_TOKEN] + encode("To be")])
    assert rolling[1] == pytest.approx(-nats(model, ids, 1), rel=1e-6)


def test_loglikelihood_and_greedy_flag(model, single_thread):
    context = "ROMEO: But soft, what light"
    prompt = [EOT_TOKEN] + encode(context)
    greedy = list(generate_tokens(model, prompt, 6, temperature=0))
    greedy_text = decode(greedy)
    assert encode(greedy_text) == greedy  # the string tokenizes back to the same tokens
    pairs = [(context, greedy_text), (context, " through yonder window")]
    results = Scorer(model, window=128).loglikelihood(pairs)
    for (_, cont), (value, _) in zip(pairs, results):
        cont_ids = encode(cont)
        ids = torch.tensor([prompt + cont_ids])
        assert value == pytest.approx(-nats(model, ids, len(prompt)), rel=1e-6)
    assert [g for _, g in results] == [True, False]


def test_generate_until_is_greedy_text_cut_at_the_stop_string(model):
    context = "KING: "
    full = decode(generate_tokens(model, [EOT_TOKEN] + encode(context), 20, temperature=0))
    stop = full[7:9]  # a stop string that occurs in the greedy text
    out = Scorer(model, window=128).generate_until(
        [(context, {"until": [stop], "max_gen_toks": 20}), (context, {"max_gen_toks": 20})]
    )
    assert out == [full[: full.find(stop)], full]


def test_lm_eval_model_answers_instances(model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from muongpt.evals.harness import lm_eval_model

    lm = lm_eval_model()(model=model, window=128)
    scorer = Scorer(model, window=128)
    req = lambda kind, args: Instance(kind, {}, args, 0)
    ll = lm.loglikelihood([req("loglikelihood", ("To be", " or not"))])
    assert ll == scorer.loglikelihood([("To be", " or not")])
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", ("To be or not",))])
    assert rolling == scorer.loglikelihood_rolling(["To be or not"])
    gen = lm.generate_until([req("generate_until", ("KING:", {"max_gen_toks": 5}))])
    assert gen == scorer.generate_until([("KING:", {"max_gen_toks": 5})])


def test_harness_cli_writes_results_beside_the_checkpoint(model, tmp_path, monkeypatch, capsys):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from muongpt.cli import evaluate as eval_cli
    from muongpt.evals.runlog import read_evals
    from muongpt.train.checkpoint import save_checkpoint

    path = tmp_path / "run" / "checkpoints" / "step_000002.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": run_config(), "step": 2})
    seen = {}

    def simple_evaluate(model, tasks, limit=None, **kwargs):  # the harness, minus its data sets
        request = Instance("loglikelihood", {}, ("To be", " or not"), 0)
        seen["ll"] = model.loglikelihood([request])[0][0]
        return {"results": {tasks[0]: {"alias": "toy", "acc,none": 0.25, "acc_stderr,none": 0.1}}}

    monkeypatch.setitem(vars(lm_eval), "simple_evaluate", simple_evaluate)  # no lazy import
    argv = [str(tmp_path / "run"), "--harness", "toy", "--device", "cpu"]  # the run folder
    assert eval_cli.main(argv) == 0
    result = json.loads((path.parent / "harness_toy.json").read_text())
    assert result["toy"]["acc,none"] == 0.25
    assert seen["ll"] == pytest.approx(
        Scorer(model, 128).loglikelihood([("To be", " or not")])[0][0]
    )
    assert "toy: acc 0.2500" in capsys.readouterr().out
    [record] = read_evals(tmp_path / "run")
    assert record["step"] == 2 and record["eval/toy/acc"] == 0.25 and record["harness"] == ["toy"]


def test_harness_without_lm_eval_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    import builtins

    from muongpt.cli import evaluate as eval_cli

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.split(".")[0] == "lm_eval":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert eval_cli.main(["x.pt", "--harness", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'muongpt[harness]'" in err


def test_long_context_is_cut_from_the_left_and_said_once(model):
    messages = []
    scorer = Scorer(model, window=16, warn=messages.append)
    long = "word " * 40 + "The cat sat on the"
    first = scorer.loglikelihood([(long, " mat"), ("To be", " or not")])
    again = scorer.loglikelihood([(long, " mat")])
    assert len(messages) == 1 and "1 of 2 requests" in messages[0]
    tokens = ([EOT_TOKEN] + encode(long) + encode(" mat"))[-17:]
    expected = -nats(model, torch.tensor([tokens]), 17 - len(encode(" mat")))
    assert first[0][0] == pytest.approx(expected, rel=1e-6) and again[0] == first[0]
