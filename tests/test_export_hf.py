"""`muongpt export hf`: transformers loads the export offline and computes muongpt's function.

A tiny random model in muongpt's own checkpoint format is exported once per module; transformers
then loads it from disk with no network, and its logits, greedy tokens and tokenizer are compared
with muongpt's own. Skipped when transformers is not installed (`pip install muongpt[hf]`).
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below must work with no network
transformers = pytest.importorskip("transformers")

from muongpt import MuonGPTError  # noqa: E402
from muongpt.assets import TINY_SHAKESPEARE  # noqa: E402
from muongpt.cli import export as export_cli  # noqa: E402
from muongpt.cli import main as main_cli  # noqa: E402
from muongpt.data.tokenizer import EOT_TOKEN, encode  # noqa: E402
from muongpt.export.hf import export_hf  # noqa: E402
from muongpt.generate import generate_tokens, load_model  # noqa: E402
from muongpt.train.checkpoint import export_checkpoint, save_checkpoint  # noqa: E402
from test_sample import random_model, run_config  # noqa: E402


def save_run(run_dir, config, model, step=7):
    """A run directory as training leaves it: checkpoint, metrics.jsonl, Hydra overrides."""
    path = run_dir / "checkpoints" / f"step_{step:06d}.pt"
    save_checkpoint(
        path, {"model": model.state_dict(), "config": config, "step": step, "tokens_seen": 896}
    )
    records = [{"step": 0, "val_loss": 10.9}, {"step": step, "tokens": 896, "val_loss": 7.25}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=tiny\n- model.n_layer=3\n")
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(muongpt model, export folder, checkpoint) of a tanh-capped 3-layer model."""
    config = run_config()
    config["model"]["logit_softcap"] = 15.0
    model = random_model(config)
    root = tmp_path_factory.mktemp("hf")
    checkpoint = save_run(root / "run", config, model)
    out, gap = export_hf(checkpoint, root / "tiny-hf")
    assert gap is not None and gap <= 1e-4
    return model, out, checkpoint


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(exported[1]), trust_remote_code=True, local_files_only=True
    ).eval()


def test_export_folder_has_the_files_transformers_needs(exported):
    _, out, _ = exported
    names = {p.name for p in out.iterdir()}
    for name in ("config.json", "model.safetensors", "modeling_muongpt.py", "tokenizer.json"):
        assert name in names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "muongpt"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_muongpt.MuonGPTForCausalLM"
    assert config["logit_softcap"] == 15.0 and config["max_position_embeddings"] == 128
    # The modeling files are self-contained: they import torch, transformers and each other.
    for name in ("modeling_muongpt.py", "configuration_muongpt.py"):
        lines = (out / name).read_text().splitlines()
        roots = {
            line.split()[1].split(".")[0] for line in lines if line.startswith(("import", "from"))
        }
        assert roots <= {"__future__", "torch", "transformers", ""}, roots


def test_logits_equal_muongpts(exported, hf_model):
    model, _, _ = exported
    ids = torch.tensor([[EOT_TOKEN] + encode(TINY_SHAKESPEARE.read_text()[:400])])
    with torch.no_grad():
        theirs, ours = hf_model(ids).logits, model(ids)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape  # sliced to 50257
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert ours.abs().max() > 1.0  # the comparison is of real logits, not zeros


def test_greedy_generation_equals_muongpts(exported, hf_model):
    model, _, _ = exported
    prompt = [EOT_TOKEN] + encode("To be, or not to be")
    ours = list(generate_tokens(model, prompt, 24, temperature=0))
    assert EOT_TOKEN not in ours  # transformers would stop there; muongpt samples on
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert out[0, len(prompt) :].tolist() == ours


def test_padded_batch_gives_each_row_its_own_logits(hf_model):
    # Left padding (as batched generation uses) must not change a row's logits.
    a, b = [EOT_TOKEN] + encode("Friends, Romans"), [EOT_TOKEN] + encode("Now is the winter of")
    pad = len(b) - len(a)
    ids = torch.tensor([[EOT_TOKEN] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    with torch.no_grad():
        batch = hf_model(ids, attention_mask=mask).logits
        alone = hf_model(torch.tensor([a])).logits
    torch.testing.assert_close(batch[0, pad:], alone[0], rtol=0, atol=1e-4)


def test_tokenizer_encodes_like_muongpt(exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported[1]))
    text = TINY_SHAKESPEARE.read_text()[:30000] + " héllo 🎉  wörld \n\n\t it's 12345 €"
    assert tokenizer(text).input_ids == encode(text)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == EOT_TOKEN
    assert tokenizer.decode(encode(text)) == text


def test_model_card_names_size_training_and_val_loss(exported):
    model, out, _ = exported
    card = (out / "README.md").read_text()
    assert f"{model.num_params():,}" in card
    assert "| tokens trained | 896 |" in card
    assert "7.2500 nats/token" in card  # the last val loss of metrics.jsonl at the step
    assert "muongpt train experiment=tiny model.n_layer=3" in card
    assert "15 tanh(logits / 15)" in card


def test_export_from_safetensors_equals_export_from_checkpoint(exported, tmp_path):
    model, _, checkpoint = exported
    weights = export_checkpoint(checkpoint, tmp_path / "model.safetensors")
    out, gap = export_hf(weights, tmp_path / "from-st")
    assert gap is not None and gap <= 1e-4
    again, _ = load_model(weights)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


def test_speedrun_is_refused_in_one_line(tmp_path, capsys):
    config = run_config()
    config["model"] = dict(name="speedrun", vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    config["model"].update(value_embeds=1, bigram_rows=211, backout_after=1, window_pattern=[1.0])
    from muongpt.config import model_config
    from muongpt.model import build_model

    model = build_model(model_config(config["model"]))
    path = tmp_path / "step_000001.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "step": 1})
    assert main_cli.main(["export", "hf", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model=speedrun cannot be exported" in err
    assert not (tmp_path / "out").exists()


def test_pom_layers_are_refused(tmp_path):
    config = run_config("hybrid")
    path = tmp_path / "step_000001.pt"
    save_checkpoint(path, {"model": random_model(config).state_dict(), "config": config})
    with pytest.raises(MuonGPTError, match=r"PoM layers \(.*\) cannot be exported"):
        export_hf(path, tmp_path / "out")


def test_existing_folder_is_kept_unless_forced_over_an_export(exported, tmp_path, capsys):
    _, out, checkpoint = exported
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "a.txt").write_text("keep me")
    assert export_cli.main(["hf", str(checkpoint), str(precious), "--force"]) == 2
    assert "not an earlier muongpt export" in capsys.readouterr().err
    assert (precious / "a.txt").read_text() == "keep me"
    assert export_cli.main(["hf", str(checkpoint), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert export_cli.main(["hf", str(checkpoint), str(out), "--force", "--no-verify"]) == 0


def test_without_transformers_the_command_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    assert export_cli.main(["hf", "missing.pt", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'muongpt[hf]'" in err


def test_a_checkpoint_of_another_format_is_one_line(tmp_path, capsys):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(4, 2)}, path)  # a foreign state dict
    assert export_cli.main(["hf", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a muongpt checkpoint" in err
    assert not (tmp_path / "out").exists()
