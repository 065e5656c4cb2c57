"""The config tree: every schema field has a yaml value, and every yaml key is a schema field."""

import dataclasses

import pytest
import yaml

from muongpt.config import CONF_DIR, DataConfig, MixingLayerConfig, ModelConfig, TrainingConfig
from muongpt.train.sinks import LoggingConfig


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    "cls,yaml_file,exempt",
    [
        (TrainingConfig, "training/default.yaml", set()),
        (ModelConfig, "model/gpt.yaml", {"gpt"}),  # sizes come from model/gpt/*.yaml
        (LoggingConfig, "logging/default.yaml", set()),
    ],
)
def test_group_defaults_hold_every_schema_field(cls, yaml_file, exempt):
    keys = set(yaml.safe_load((CONF_DIR / yaml_file).read_text()))
    assert keys == fields(cls) - exempt


@pytest.mark.parametrize(
    "cls,folder",
    [(MixingLayerConfig, "mixing_layer"), (DataConfig, "data")],
)
def test_group_options_use_only_schema_fields(cls, folder):
    for path in sorted((CONF_DIR / folder).glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()))
        assert keys <= fields(cls), f"{path.name}: {keys - fields(cls)}"


def test_size_files_are_gpt2_shapes():
    sizes = {
        p.stem: yaml.safe_load(p.read_text()) for p in (CONF_DIR / "model" / "gpt").glob("*.yaml")
    }
    assert sizes["d12"] == {"n_layer": 12, "n_head": 12, "n_embd": 768}
    assert sizes["d24"] == {"n_layer": 24, "n_head": 16, "n_embd": 1024}
    assert sizes["d36"] == {"n_layer": 36, "n_head": 20, "n_embd": 1280}
    assert sizes["d48"] == {"n_layer": 48, "n_head": 25, "n_embd": 1600}
