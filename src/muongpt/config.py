"""Config schemas, registered in Hydra's ConfigStore, and the upgrade of stored configs.

Each dataclass is the only place its defaults live; the yaml tree under ``muongpt/conf`` holds
only what a group choice or an experiment changes, so a misspelled key or a value of the wrong
type is an error before anything runs. Schemas live beside what they configure:

- ``model``: ``muongpt.model.MODELS`` (``gpt``: ``GPTConfig``, ``speedrun``: ``SpeedrunConfig``),
  sizes in ``model/size``, token mixers in ``mixing_layer`` (``model.mixing``);
- ``optimizer``: ``muongpt.optim.config`` (``muon``, ``soap``, ``adamw``);
- ``kernels``: ``muongpt.kernels.converters.KernelsConfig``;
- ``data``, ``training``, ``logging``: here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from muongpt import MuonGPTError
from muongpt.kernels.converters import KernelsConfig
from muongpt.model import MODELS, GPTConfig
from muongpt.optim.config import OPTIMIZER_CONFIGS

CONF_DIR = Path(__file__).resolve().parent / "conf"


TEXT_VAL_FRACTION = 0.1  # data.source=text: the last tenth of the text is validation


@dataclass
class DataConfig:
    name: str = "shakespeare"
    source: str = "text"  # "text": one text file split into train/val; "shards": .bin files
    text_path: str = ""  # empty: the tiny-Shakespeare text shipped in the package
    val_fraction: float | None = None  # held-out tail of the text; None: TEXT_VAL_FRACTION
    train_files: str = ""  # glob, folder or file of .bin shards
    val_files: str = ""
    align_to_bos: bool = False


@dataclass
class TrainingConfig:
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    autocast_bf16: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False
    compile_mode: str = "model"  # model: one graph | blocks: each block + the head (overlap)
    # replicate: every rank holds the model (sharded optimizers) | fsdp: FSDP2 parameter sharding
    parallel: str = "replicate"
    # torch._inductor options for the compiled model, e.g. {coordinate_descent_tuning: true}
    inductor: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 1024  # tokens per row (evaluation rows always; training rows unless below)
    # training rows of these lengths, each over an equal slice of the run ([]: seq_len throughout)
    seq_len_schedule: list[int] = field(default_factory=list)
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_steps: int = 1000
    # lr warmup and cooldown (to final_lr_frac): in steps (when > 0), else as fractions of
    # max_steps
    warmup_steps: int = 0
    cooldown_steps: int = 0
    warmup_frac: float = 0.0
    cooldown_frac: float = 0.0
    final_lr_frac: float = 0.0
    cooldown_shape: str = "linear"  # linear | sqrt (1 - sqrt of the cooldown's progress)
    grad_clip: float = 0.0  # 0 disables clipping
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 0  # also every N steps (0: none besides the time-based and final ones)
    checkpoint_minutes: float = 10.0  # a checkpoint at least this often (wall minutes; 0: off)
    keep_checkpoints: int = 2  # the newest K checkpoints are kept; 0 keeps all
    resume: str = "none"  # none | auto (newest in the run dir) | a checkpoint file or run dir
    export_safetensors: bool = True  # model.safetensors (weights only) beside the final checkpoint
    # false: nothing is written, not even at the end or on a signal (sweeps and benchmarks whose
    # weights are not wanted: the speed-run d12's state is 4.9 GB); such a run cannot be resumed
    save_checkpoints: bool = True
    # Non-finite losses: 0 stops at the first (no per-step sync); N > 0 skips up to N steps
    # (their update is not applied), at the cost of one device->host sync per step.
    max_bad_steps: int = 0
    sample_tokens: int = 64
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    progress_bar: bool = True
    # Steps run (and then undone: weights, optimizer state, data position restored) before the
    # timed run, so compilation and autotuning stay out of train_seconds. 0: none.
    compile_warmup_steps: int = 0
    attn_window_start: int = (
        0  # speedrun: grow the window from this to model.attn_window (0: fixed)
    )
    batch_size_start: int = 0  # sequences per step at step 0, grown to batch_size (0: fixed)
    batch_ramp_steps: int = 0  # ... linearly over this many steps
    # every lr times (this step's tokens / batch_size x seq_len)^p under a batch ramp or a row
    # schedule (modded-nanogpt raised its lr by (batch ratio)^0.5 to ^0.6 as its batch grew)
    lr_token_power: float = 0.0
    # model.tie_embed_head: the share of the run for which embedding and head stay one weight
    untie_embed_head_frac: float = 1.0  # 1: tied throughout


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # event files in <run_dir>/tensorboard
    wandb: bool = False  # needs `pip install wandb`
    wandb_project: str = "muongpt"
    wandb_mode: str = "offline"  # offline (default, no network) | online | disabled


@dataclass
class Config:
    experiment_name: str = MISSING
    model: Any = MISSING  # a schema of muongpt.model.MODELS, chosen by the model group
    optimizer: Any = MISSING  # a schema of muongpt.optim.config, chosen by the optimizer group
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="muongpt_schema", node=Config)
    for name, (schema, _) in MODELS.items():
        store.store(group="model", name=f"{name}_schema", node=schema)
    for name, schema in OPTIMIZER_CONFIGS.items():
        store.store(group="optimizer", name=f"{name}_schema", node=schema)


def model_config(model: DictConfig | dict) -> GPTConfig:
    """The model dataclass of a composed or stored ``model`` section (its ``name`` picks the
    schema); validation errors are one line naming the key."""
    if isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    name = model.get("name", "gpt")
    if name not in MODELS:
        raise MuonGPTError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MODELS[name][0]), model))


# ---------------------------------------------------------------- stored configs of older versions
# muongpt 0.1 kept every model option in one flat section (sizes under model.gpt, mixers under
# mixing_layer, kernels as model flags); the speed-run model had each part behind its own flag.
V01_SPEEDRUN_PARTS = {
    "unet_skips": True,
    "x0_mix": True,
    "embed_norm": True,
    "residual_bf16": True,
    "key_offset": True,
    "rope_truncate": True,
    "attention": "flex",
    "doc_mask": True,
    "logit_softcap": "sigmoid",
}
V01_PLAIN = {
    "value_embeds": 0,
    "unet_skips": False,
    "x0_mix": False,
    "embed_norm": False,
    "smear": False,
    "attn_gate": False,
    "key_offset": False,
    "residual_bf16": False,
    "bigram_embed": 0,
    "backout_after": 0,
    "mtp_weights": [],
    "rope_truncate": False,
    "attn_scale": 0.0,
    "window_pattern": [1.0],
    "attention": "sdpa",
    "doc_mask": False,
    "attn_window": 0,
}


def _upgrade_v01_model(old: dict, mixing: dict) -> tuple[dict, list[str]]:
    """(model section, converters) of a muongpt 0.1 model section."""
    sizes = {k: old["gpt"][k] for k in ("n_layer", "n_head", "n_embd")}
    common = {
        "vocab_size": old.get("vocab_size", 50257),
        "mlp_ratio": old.get("mlp_ratio", 4),
        "rope_base": old.get("rope_base", 10000.0),
        **sizes,
        "mixing": {
            k: mixing[k] for k in ("pattern", "pom_degree", "pom_expand", "pom_n_sel_heads")
        },
    }
    converters = []
    if old.get("fp8_head"):
        converters.append("fp8_head_loss" if old.get("fp8_fused_loss") else "fp8_head")
    if old.get("fused_mlp"):
        converters.append("fused_mlp")
    plain = all(old.get(k, v) == v for k, v in V01_PLAIN.items())
    if plain and old.get("logit_softcap", "none") in ("none", "tanh"):
        cap = old.get("softcap_value", 15.0) if old.get("logit_softcap") == "tanh" else 0.0
        return {"name": "gpt", **common, "logit_softcap": cap}, converters
    speedrun = all(old.get(k) == v for k, v in V01_SPEEDRUN_PARTS.items())
    # 0.1's multi-token weights decayed from step 0 (training.mtp_decay): not today's schedule
    removed = [k for k in ("smear", "attn_gate") if old.get(k)] + (
        ["mtp_weights with training.mtp_decay"] if old.get("mtp_weights") else []
    )
    if not speedrun or removed:
        off = sorted(k for k, v in V01_SPEEDRUN_PARTS.items() if old.get(k) != v)
        raise MuonGPTError(
            "config of muongpt 0.1 (format 1): this combination of model options has no "
            f"muongpt 0.2 model (removed options on: {removed or 'none'}; speed-run parts off: "
            f"{off or 'none'})"
        )
    model = {
        "name": "speedrun",
        **common,
        "value_embeds": old["value_embeds"],
        "bigram_rows": old["bigram_embed"],
        "backout_after": old["backout_after"],
        "attn_window": old["attn_window"],
        "window_pattern": old["window_pattern"],
        "attn_scale": old["attn_scale"],
        "sigmoid_cap": old.get("sigmoid_cap", [30.0, 7.5, 0.0]),
    }
    return model, ["flex_attention", *converters]


def upgrade_config(stored: dict) -> dict:
    """A config stored by an older muongpt (checkpoint, export) in the current layout; configs of
    the current layout pass unchanged. Unknown layouts stop with one line naming the format."""
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise MuonGPTError("stored config has no model section: not a muongpt config")
    if "name" in stored["model"]:  # the current layout (format 2, muongpt 0.2)
        return _with_former_defaults(_without_removed_options(stored))
    if "gpt" not in stored["model"] or "mixing_layer" not in stored:
        raise MuonGPTError("stored config is of an unknown format (neither muongpt 0.1 nor 0.2)")
    config = {k: v for k, v in stored.items() if k not in ("model", "mixing_layer")}
    old = stored["model"]
    config["model"], converters = _upgrade_v01_model(old, stored["mixing_layer"])
    config["kernels"] = {
        "converters": converters,
        "fp8_scales": old.get("fp8_scales", [2.0, 32.0, 2.0**29]),
    }
    optimizer = dict(stored.get("optimizer", {}))
    schema = OPTIMIZER_CONFIGS.get(optimizer.get("name", "muon"))
    if schema is not None:
        known = {f.name for f in dataclasses.fields(schema)}
        config["optimizer"] = {k: v for k, v in optimizer.items() if k in known}
    training = dict(config.get("training", {}))
    training.pop("mtp_decay", None)
    config["training"] = training
    return _with_former_defaults(config)


# PoM options whose default changed: a stored config with PoM layers and without the key was
# trained with the value here (pom_conv: 0 until 2026-12-04). Without PoM layers they change
# nothing, and stay absent (a resume lists them, does not refuse them).
FORMER_MIXING_DEFAULTS = {"pom_conv": 0}


# Options of the current layout removed since (docs/speedrun.md, "Removed options"), with the
# value that meant off: a stored config with that value loads without the key; any other value
# names a model this version cannot build.
REMOVED_MODEL_OPTIONS = {"mtp_weights": []}  # removed 2026-12-05


def _without_removed_options(config: dict) -> dict:
    model = dict(config["model"])
    for key, off in REMOVED_MODEL_OPTIONS.items():
        if key in model and model.pop(key) != off:
            raise MuonGPTError(
                f"stored config sets model.{key}, an option removed from this version of muongpt "
                "(docs/speedrun.md, 'Removed options'): its model cannot be built"
            )
    return {**config, "model": model}


def _with_former_defaults(config: dict) -> dict:
    data = config.get("data")
    # data.val_fraction was 0.1 by default until 2026-12-05, also where it was not read (shards)
    if isinstance(data, dict) and data.get("val_fraction") == TEXT_VAL_FRACTION:
        config = {**config, "data": {**data, "val_fraction": None}}
    mixing = config["model"].get("mixing")
    if not isinstance(mixing, dict) or "pom" not in mixing.get("pattern", []):
        return config
    if all(k in mixing for k in FORMER_MIXING_DEFAULTS):
        return config
    model = {**config["model"], "mixing": {**FORMER_MIXING_DEFAULTS, **mixing}}
    return {**config, "model": model}
