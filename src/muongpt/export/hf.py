"""Export a trained ``model=gpt`` checkpoint as a Hugging Face transformers model directory.

    OUT_DIR/
      config.json                  MuonGPTConfig + auto_map (trust_remote_code)
      configuration_muongpt.py     the config class   } self-contained: torch + transformers
      modeling_muongpt.py          the model's math   }
      model.safetensors            fp32 weights, muongpt's parameter names
      generation_config.json       end-of-text as bos/eos
      vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
      README.md                    model card: architecture, size, training, val loss, command
      NOTICE                       the GPT-2 vocabulary's MIT licence

The directory loads offline with ``AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``. Before it is moved into
place the export is loaded back with transformers and its logits compared with muongpt's.

Exported: the lean GPT (``model=gpt``) with attention layers. Refused, in one line each:
``model=speedrun`` (its extra parts have no modeling file here) and PoM layers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from muongpt import MuonGPTError, __version__
from muongpt.assets import ASSETS_DIR, GPT2_MERGES, GPT2_TIKTOKEN
from muongpt.evals.runlog import run_dir_of
from muongpt.model.gpt import GPT, GPTConfig

HF_FILES = Path(__file__).resolve().parent / "hf_files"
EOT = "<|endoftext|>"
INSTALL_HINT = "muongpt export hf needs transformers: pip install 'muongpt[hf]'"
VERIFY_TOLERANCE = 1e-4  # max |logit difference|, fp32 on CPU


def require_transformers() -> None:
    """Stop with one line naming the extra when transformers (or tokenizers) is missing."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MuonGPTError(INSTALL_HINT) from None


def check_exportable(config: GPTConfig, source: str) -> None:
    """Refuse, in one line, a model whose math the modeling file does not implement."""
    if config.name != "gpt":
        raise MuonGPTError(
            f"{source}: model={config.name} cannot be exported to Hugging Face (value embeddings, "
            "U-net skips, x0 mixing, bigram table, backout, windowed document attention and the "
            "sigmoid cap have no modeling file); only model=gpt exports"
        )
    pom = [i for i in range(config.n_layer) if config.mixer_of_layer(i) != "attention"]
    if pom:
        raise MuonGPTError(
            f"{source}: PoM layers ({', '.join(map(str, pom))}) cannot be exported to Hugging "
            "Face; only attention layers (mixing_layer=self_attention) export"
        )


# ---------------------------------------------------------------- config and weights
def hf_config(config: GPTConfig, seq_len: int) -> dict:
    """config.json: muongpt's model fields under the names MuonGPTConfig takes, plus auto_map."""
    return {
        "architectures": ["MuonGPTForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_muongpt.MuonGPTConfig",
            "AutoModelForCausalLM": "modeling_muongpt.MuonGPTForCausalLM",
        },
        "model_type": "muongpt",
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "mlp_ratio": config.mlp_ratio,
        "rope_base": float(config.rope_base),
        "logit_softcap": float(config.logit_softcap),
        "max_position_embeddings": seq_len,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "muongpt_version": __version__,
    }


def write_weights(model: GPT, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers reads "pt"
    os.chmod(path, 0o644)


# ---------------------------------------------------------------- tokenizer
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the alphabet of vocab.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes map past 255, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_vocab() -> dict[str, int]:
    """vocab.json from the shipped tiktoken ranks: the same ids muongpt's tokenizer uses."""
    from muongpt.data.tokenizer import EOT_TOKEN, _load_ranks

    to_char = byte_to_unicode()
    vocab = {
        "".join(to_char[b] for b in token): rank
        for token, rank in _load_ranks(GPT2_TIKTOKEN).items()
    }
    vocab[EOT] = EOT_TOKEN
    return vocab


def write_tokenizer(out: Path, seq_len: int) -> None:
    """The GPT-2 byte-level BPE: slow-format files and tokenizer.json, end-of-text as special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = gpt2_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    shutil.copyfile(GPT2_MERGES, out / "merges.txt")
    os.chmod(out / "merges.txt", 0o644)
    merges = [
        tuple(line.split(" "))
        for line in GPT2_MERGES.read_text(encoding="utf-8").splitlines()[1:]  # line 1: version
        if line
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": seq_len,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ---------------------------------------------------------------- the run it came from
def read_metrics(run_dir: Path | None, step: int | None) -> dict:
    """The last val loss and token count logged at or before ``step`` in metrics.jsonl."""
    found: dict = {}
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(record, dict) or (step is not None and record.get("step", 0) > step):
            continue
        for key in ("tokens", "val_loss"):
            if isinstance(record.get(key), (int, float)):
                found[key] = record[key]
                found[f"{key}_step"] = record.get("step")
    return found


def training_command(run_dir: Path | None, config: dict) -> str:
    """The ``muongpt train`` command line of the run (its Hydra overrides), when they were kept."""
    overrides = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if overrides is not None and overrides.is_file():
        from omegaconf import OmegaConf

        try:
            args = OmegaConf.to_container(OmegaConf.load(overrides))
        except Exception:  # an unreadable file only costs the card its command line
            args = None
        if isinstance(args, list):
            return " ".join(["muongpt train", *map(str, args)])
    name = config.get("experiment_name")
    return f"muongpt train experiment={name}  (reconstructed; the run's overrides were not found)"


# ---------------------------------------------------------------- model card
def model_card(model: GPT, state: dict, source: Path, seq_len: int, name: str = "PATH") -> str:
    from omegaconf import OmegaConf

    c, config = model.config, state["config"]
    run_dir = run_dir_of(source)
    step = state.get("step")
    metrics = read_metrics(run_dir, step)
    tokens = state.get("tokens_seen", metrics.get("tokens"))
    val_loss = state.get("final_val_loss", metrics.get("val_loss"))
    val_at = (
        "" if "final_val_loss" in state else f" (logged at step {metrics.get('val_loss_step')})"
    )
    data = config.get("data", {})
    kernels = config.get("kernels", {}).get("converters") or []
    cap = f"{c.logit_softcap:g} tanh(logits / {c.logit_softcap:g})" if c.logit_softcap else "none"
    rows = [
        ("layers", c.n_layer),
        ("heads", f"{c.n_head} (head dim {c.n_embd // c.n_head})"),
        ("width", c.n_embd),
        ("MLP", f"ReLU^2, {c.mlp_ratio}x wide"),
        ("vocabulary", f"{c.vocab_size:,} GPT-2 tokens (tables padded to {c.padded_vocab_size:,})"),
        ("context (training)", f"{seq_len:,} tokens (RoPE, base {c.rope_base:g})"),
        ("logit soft-cap", cap),
        (
            "parameters",
            f"{model.num_params():,} ({model.num_params(non_embedding=True):,} without the embedding)",
        ),
        ("training steps", step if step is not None else "unknown"),
        ("tokens trained", f"{int(tokens):,}" if tokens is not None else "unknown"),
        (
            "final val loss",
            f"{val_loss:.4f} nats/token{val_at}" if val_loss is not None else "not recorded",
        ),
        ("data", data.get("name", "unknown")),
        ("optimizer", config.get("optimizer", {}).get("name", "unknown")),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    kernel_note = (
        f"\nIt was trained with the kernel converters {', '.join(kernels)}; this export computes "
        "the same function in plain fp32 (an FP8 head's rounding is not reproduced).\n"
        if kernels
        else ""
    )
    return f"""---
library_name: transformers
tags: [muongpt, custom_code, text-generation]
---

# {config.get("experiment_name", "muongpt model")}

A GPT trained with [muongpt](https://pypi.org/project/muongpt/) {__version__} and exported by
`muongpt export hf {source.name}`.

| | |
|---|---|
{table}

## Architecture

The lean muongpt GPT: token embedding; per block `x = x + attn(norm(x))`, `x = x + mlp(norm(x))`;
`logits = cap(lm_head(norm(x)))` in fp32. RMSNorm has no learned scale; there are no biases;
attention uses QK-norm and rotary position embedding (dims i and i + head_dim/2 rotate together);
the MLP is `proj(relu(fc(x))^2)`; the head is not tied to the embedding. `modeling_muongpt.py`
holds the whole model (torch + transformers only).
{kernel_note}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}")  # trust_remote_code=True: no question asked
ids = tokenizer("<|endoftext|>To be, or not to be", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

Every training document began with the end-of-text token (id 50256): start prompts with it. The
tokenizer reads the text `<|endoftext|>` as that token; muongpt's own `encode` reads it as text.

## Training

```
{training_command(run_dir, config)}
```

<details><summary>resolved config</summary>

```yaml
{OmegaConf.to_yaml(config).strip()}
```

</details>

The tokenizer is OpenAI's GPT-2 byte-pair encoding (MIT licence, see NOTICE).
"""


# ---------------------------------------------------------------- verify and write
def verify_export(folder: Path, model: GPT) -> float:
    """Load ``folder`` with transformers and compare its logits with muongpt's; the max gap."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from muongpt.data.tokenizer import EOT_TOKEN, encode

    ids = torch.tensor([[EOT_TOKEN] + encode("To be, or not to be, that is the question")])
    hf_logging.disable_progress_bar()  # the check is one line of output, not a loading bar
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(folder), trust_remote_code=True, local_files_only=True
        )
    finally:
        hf_logging.enable_progress_bar()
    reference = model.to("cpu", torch.float32)
    with torch.no_grad():
        gap = float((hf.float()(ids).logits - reference(ids)).abs().max())
    if not gap <= VERIFY_TOLERANCE:
        raise MuonGPTError(
            f"export check failed: transformers' logits differ from muongpt's by {gap:.3g} "
            f"(> {VERIFY_TOLERANCE}); nothing was written"
        )
    return gap


def is_previous_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "muongpt"
    except (OSError, ValueError, AttributeError):
        return False


def export_hf(
    checkpoint: str | Path, out_dir: str | Path, force: bool = False, verify: bool = True
) -> tuple[Path, float | None]:
    """Write the transformers directory of a checkpoint; returns (OUT_DIR, verified logit gap).

    Everything is written to a temporary folder beside OUT_DIR and renamed into place at the
    end, so a failure leaves OUT_DIR as it was. An existing non-empty OUT_DIR is replaced only
    with ``force`` and only when it holds an earlier muongpt export."""
    from muongpt.generate import load_model

    source, out = Path(checkpoint), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MuonGPTError(f"{out} is a file, not a folder; choose another OUT_DIR")
    require_transformers()
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise MuonGPTError(
                f"{out} exists and is not empty; choose another OUT_DIR or pass --force"
            )
        if not is_previous_export(out):
            raise MuonGPTError(f"{out} is not an earlier muongpt export; refusing to replace it")
    model, state = load_model(source)
    check_exportable(model.config, str(source))
    seq_len = int((state["config"].get("training") or {}).get("seq_len", 1024))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(
            json.dumps(hf_config(model.config, seq_len), indent=2) + "\n"
        )
        generation = {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in ("configuration_muongpt.py", "modeling_muongpt.py"):
            shutil.copyfile(HF_FILES / name, tmp / name)
        write_weights(model, tmp / "model.safetensors")
        write_tokenizer(tmp, seq_len)
        shutil.copyfile(ASSETS_DIR / "NOTICE", tmp / "NOTICE")
        (tmp / "README.md").write_text(model_card(model, state, source, seq_len, out.name))
        gap = verify_export(tmp, model) if verify else None
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, gap
