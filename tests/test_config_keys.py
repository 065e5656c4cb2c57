"""Unknown config keys (also those added with +), typed override errors, and the --help text."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.config import CONF_DIR, register_configs
from muongpt.train.config_keys import (
    MAIN_KEYS,
    check_config_keys,
    command_help,
    explain_override_error,
    unknown_keys,
)


def compose_config(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_error(*overrides) -> str | None:
    with pytest.raises(Exception) as info:  # noqa: B017 - Hydra raises several types
        compose_config(*overrides)
    return explain_override_error(info.value)


def test_every_default_config_has_only_schema_keys():
    for experiment in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        assert unknown_keys(compose_config(f"experiment={experiment}")) == [], experiment


def test_keys_added_with_plus_are_refused_with_the_closest_valid_ones():
    cfg = compose_config("+training.max_step=10", "+optimizer.lrr=0.1", "+training.inductor.x=1")
    assert unknown_keys(cfg) == [
        "unknown key optimizer.lrr (did you mean lr?)",
        "unknown key training.max_step (did you mean max_steps or max_bad_steps?)",
    ]  # training.inductor is a free-form dict: its keys are torch's to check
    with pytest.raises(MuonGPTError) as info:
        check_config_keys(cfg)
    assert "\n" not in str(info.value) and "did you mean max_steps" in str(info.value)
    assert unknown_keys(compose_config("+zzz=1")) == ["unknown key zzz"]  # nothing close


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.max_steps=abc", "training.max_steps must be an int, got 'abc'"),
        ("training.compile=maybe", "training.compile must be true or false, got 'maybe'"),
        ("optimizer.lr=fast", "optimizer.lr must be a number, got 'fast'"),
        ("optimizer.adam_betas=abc", "optimizer.adam_betas must be a list of numbers, got 'abc'"),
        ("optimizer.betas=abc", "unknown key optimizer.betas (did you mean adam_betas"),
        ("training.max_step=10", "unknown key training.max_step (did you mean max_steps"),
    ],
)
def test_override_errors_name_the_key_and_the_expected_type(override, message):
    assert compose_error(override).startswith(message)


def test_help_lists_groups_and_main_keys_that_exist():
    text = command_help("muongpt-train", "Train a GPT.")
    lines = text.splitlines()
    assert lines[0].startswith("usage: muongpt-train") and len(lines) < 40
    assert "optimizer" in text and "adamw, muon, soap" in text and "experiment" in text
    assert len(MAIN_KEYS) == 10
    cfg = compose_config()
    for key, what in MAIN_KEYS:
        assert f"  {key}" in text and what in text
        name = key.split("=")[0]
        if name.startswith("hydra."):
            continue
        if "." in name:  # a key: it must exist in the config, so renames show up here
            node, _, leaf = name.rpartition(".")
            assert leaf in OmegaConf.select(cfg, node), name
        else:  # a group
            assert (CONF_DIR / name).is_dir(), name
