"""The config tree: one schema per group, yaml files holding only changes, and stored configs of
older versions upgraded to the current layout."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.config import CONF_DIR, Config, model_config, register_configs, upgrade_config
from muongpt.kernels.converters import KernelsConfig
from muongpt.model import MODELS, GPTConfig, SpeedrunConfig, build_model
from muongpt.optim.combined import as_optimizer_config
from muongpt.optim.config import OPTIMIZER_CONFIGS

V01_CONFIGS = json.loads((Path(__file__).parent / "data" / "configs_v0.1.json").read_text())


def composed(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_the_core_model_config_stays_small():
    assert len(dataclasses.fields(GPTConfig)) <= 12


@pytest.mark.parametrize("model", sorted(MODELS))
def test_both_models_compose_and_build(model):
    cfg = composed(f"model={model}", "model/size=d12")
    config = model_config(cfg["model"])
    assert type(config) is MODELS[model][0] and config.n_layer == 12
    assert cfg["optimizer"]["name"] == "muon" and cfg["kernels"]["converters"] == []


def test_every_group_option_and_experiment_composes():
    for folder in ("model", "model/size", "mixing_layer", "optimizer", "data", "experiment"):
        for path in sorted((CONF_DIR / folder).glob("*.yaml")):
            cfg = composed(f"{folder}={path.stem}", "model/size=d12")
            model_config(cfg["model"])  # validates the model section against its schema


def _defaults(schema) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _repeats(values: dict, defaults: dict, where: str) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out += _repeats(value, defaults[key], f"{where}.{key}")
        elif key in defaults and defaults[key] == value and key != "name":
            out.append(f"{where}.{key}")
    return out


def test_group_files_hold_only_what_they_change():
    """Each default lives in its dataclass: no group file repeats a schema default."""
    schemas = {"data": _defaults(Config)["data"]}
    for name, schema in OPTIMIZER_CONFIGS.items():
        schemas[f"optimizer/{name}"] = _defaults(schema)
    repeated = []
    for path in sorted((CONF_DIR / "data").glob("*.yaml")):
        repeated += _repeats(yaml.safe_load(path.read_text()), schemas["data"], path.name)
    for path in sorted((CONF_DIR / "optimizer").glob("*.yaml")):
        values = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
        repeated += _repeats(values, schemas[f"optimizer/{path.stem}"], path.name)
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        cfg = composed(f"experiment={path.stem}")
        model_defaults = _defaults(MODELS[cfg["model"]["name"]][0])
        repeated += _repeats(values.get("model", {}), model_defaults, f"{path.name}: model")
        optimizer = _defaults(OPTIMIZER_CONFIGS[cfg["optimizer"]["name"]])
        repeated += _repeats(values.get("optimizer", {}), optimizer, f"{path.name}: optimizer")
        training = _defaults(Config)["training"]
        repeated += _repeats(values.get("training", {}), training, f"{path.name}: training")
    assert repeated == []


def test_size_files_are_gpt2_shapes():
    sizes = {
        p.stem: yaml.safe_load(p.read_text()) for p in (CONF_DIR / "model/size").glob("*.yaml")
    }
    assert sizes["d12"] == {"n_layer": 12, "n_head": 12, "n_embd": 768}
    assert sizes["d24"] == {"n_layer": 24, "n_head": 16, "n_embd": 1024}
    assert sizes["d36"] == {"n_layer": 36, "n_head": 20, "n_embd": 1280}
    assert sizes["d48"] == {"n_layer": 48, "n_head": 25, "n_embd": 1600}


def built_model(model: dict):
    """The model config, with PoM's options at their defaults where no layer is PoM (they
    build nothing there)."""
    config = model_config(model)
    if "pom" not in config.mixing.pattern:
        config.mixing = type(config.mixing)(pattern=config.mixing.pattern)
    return config


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny", []),
        # 0.1's speed run had no input gates, an MLP in every layer and an untied head (all three
        # on since 2026-12-04), two rows per step for 225 steps (one row since 2026-12-05), AdamW
        # betas (0.8, 0.95) for every side group, Muon's momentum warmed up to 0.95 over 300 steps,
        # fp32 lookup tables and a cooldown over 40% of the run (since 2026-12-05: (0.5, 0.95),
        # momentum 0.85 throughout, bf16_tables, half the run)
        (
            "speedrun_bench",
            [
                "experiment=speedrun_bench",
                "model.gate_dims=0",
                "model.mlp_free_layers=[]",
                "model.tie_embed_head=false",
                "training.batch_size=2",
                "training.micro_batch_size=2",
                "training.max_steps=225",
                "optimizer.momentum=0.95",
                "optimizer.adam_betas=[0.8,0.95]",
                "kernels.converters=[flex_attention,fp8_head_loss,fused_mlp]",
                "training.cooldown_frac=0.4",
            ],
        ),
        # 0.1 had no PoM convolution, expansion 2 and one selection head (today's defaults: 4, 1, 4)
        (
            "hybrid_baseline",
            [
                "experiment=hybrid_baseline",
                "model.mixing.pom_conv=0",
                "model.mixing.pom_expand=2",
                "model.mixing.pom_n_sel_heads=1",
            ],
        ),
    ],
)
def test_configs_stored_by_version_0_1_upgrade_to_the_same_run(name, overrides):
    """The resolved configs muongpt 0.1 wrote into its checkpoints (composed by that version's
    code) describe the same model, kernels, optimizer and schedule as today's experiment."""
    old, new = upgrade_config(V01_CONFIGS[name]), composed(*overrides)
    assert built_model(old["model"]) == built_model(new["model"])
    # keys added since 0.1 (embed_head_every) are absent there and read as their defaults
    assert KernelsConfig(**old["kernels"]) == KernelsConfig(**new["kernels"])
    assert as_optimizer_config(old["optimizer"]) == as_optimizer_config(new["optimizer"])
    schedule = ("max_steps", "final_lr_frac", "attn_window_start", "seq_len", "batch_size")
    assert {k: old["training"][k] for k in schedule} == {k: new["training"][k] for k in schedule}
    total = new["training"]["max_steps"]
    for phase in ("warmup", "cooldown"):
        steps = round(new["training"][f"{phase}_frac"] * total) or new["training"][f"{phase}_steps"]
        assert old["training"][f"{phase}_steps"] == steps
    assert upgrade_config(new) == new  # the current layout passes unchanged


def test_stored_configs_without_a_changed_default_keep_the_value_they_trained_with():
    """pom_conv's default went from 0 to 4: a stored PoM config without the key had no
    convolution, and must rebuild the model its weights belong to."""
    new = composed("mixing_layer=pom", "model/size=tiny")
    assert new["model"]["mixing"]["pom_conv"] == 4
    stored = json.loads(json.dumps(new))
    del stored["model"]["mixing"]["pom_conv"]
    upgraded = upgrade_config(stored)
    assert upgraded["model"]["mixing"]["pom_conv"] == 0
    assert model_config(upgraded["model"]) == model_config(
        composed("mixing_layer=pom", "model/size=tiny", "model.mixing.pom_conv=0")["model"]
    )
    assert upgrade_config(new) == new  # a config that names the key keeps it
    v01 = upgrade_config(V01_CONFIGS["hybrid_baseline"])
    assert v01["model"]["mixing"]["pom_conv"] == 0


def test_stored_data_val_fraction_of_the_former_default_reads_as_unset():
    """data.val_fraction defaulted to 0.1 until 2026-12-05, also with shard data, which never
    read it: a stored 0.1 is today's unset value (the text split is the same), so neither a
    resume nor the shard check sees a setting that was never made."""
    new = composed("experiment=speedrun_bench")
    assert new["data"]["val_fraction"] is None
    stored = json.loads(json.dumps(new))
    stored["data"]["val_fraction"] = 0.1
    assert upgrade_config(stored) == new
    stored["data"]["val_fraction"] = 0.05  # set on purpose: kept, and refused with shards
    assert upgrade_config(stored)["data"]["val_fraction"] == 0.05
    for name in ("tiny", "speedrun_bench"):  # muongpt 0.1 wrote 0.1 with text and shards
        assert upgrade_config(V01_CONFIGS[name])["data"]["val_fraction"] is None


def test_stored_configs_with_an_option_removed_since_load_when_it_was_off():
    """model.mtp_weights (removed 2026-12-05): a stored speed-run config with it off ([]) builds
    today's model; with it on, the model cannot be built, and the error says so."""
    new = composed("experiment=speedrun_bench")
    stored = json.loads(json.dumps(new))
    stored["model"]["mtp_weights"] = []
    assert upgrade_config(stored) == new
    stored["model"]["mtp_weights"] = [0.5, 0.25]
    with pytest.raises(MuonGPTError, match="sets model.mtp_weights, an option removed"):
        upgrade_config(stored)


def test_a_sharded_checkpoint_reads_its_stored_config_as_upgraded(tmp_path):
    """A .dcp checkpoint whose stored config has a removed option off (model.mtp_weights: [],
    as speed-run configs stored while the option existed have) is read into the single-process
    layout: its model is built from the upgraded config, as a resume or a sample builds it."""
    from muongpt.optim import build_optimizer
    from muongpt.train.checkpoint import load_checkpoint
    from muongpt.train.fsdp import save_sharded, sharded_state

    cfg = composed(
        "model=speedrun",
        "model/size=tiny",
        "model.bigram_rows=0",
        "model.backout_after=2",
        "model.value_embeds=1",
    )
    model = build_model(model_config(cfg["model"]))
    optimizer = build_optimizer(model, cfg["optimizer"])
    stored = {**cfg, "model": {**cfg["model"], "mtp_weights": []}}
    state = {**sharded_state(model, optimizer.optimizers), "config": stored, "step": 3}
    path = save_sharded(tmp_path / "step_000003.dcp", state, is_main=True)
    loaded = load_checkpoint(path)
    assert loaded["config"] == stored and loaded["step"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["model"][name], value)


def test_removed_options_and_unknown_layouts_are_one_line_errors():
    with pytest.raises(MuonGPTError, match="removed options on: \\['smear'\\]"):
        upgrade_config(V01_CONFIGS["smear"])
    with pytest.raises(MuonGPTError, match="unknown format"):
        upgrade_config({"model": {"n_layer": 2}})
    with pytest.raises(MuonGPTError, match="no model section"):
        upgrade_config({"training": {}})


def test_speedrun_config_errors_name_the_key():
    with pytest.raises(MuonGPTError, match="model.backout_after"):
        SpeedrunConfig(n_layer=4, n_head=4, n_embd=128)
    with pytest.raises(MuonGPTError, match="logit_softcap"):
        SpeedrunConfig(logit_softcap=15.0)
    with pytest.raises(MuonGPTError, match="pattern entries"):
        build_model(model_config({"name": "gpt", "mixing": {"pattern": ["none"]}}))
