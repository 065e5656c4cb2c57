"""Logging sinks: TensorBoard event files read back, W&B gated on the package, config defaults."""

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.train.sinks import (
    TENSORBOARD_DIR,
    LoggingConfig,
    TensorBoardSink,
    make_sinks,
    scalars,
)

RECORDS = [
    {
        "step": 5,
        "tokens": 640,
        "lr": 0.01,
        "elapsed_s": 1.5,
        "train_loss": 9.5,
        "tokens_per_s": 427.0,
    },
    {
        "step": 10,
        "tokens": 1280,
        "lr": 0.005,
        "elapsed_s": 3.0,
        "train_loss": 8.25,
        "val_loss": 8.5,
    },
]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_keeps_finite_numbers_only():
    record = {"step": 3, "loss": 2.5, "n": 7, "flag": True, "name": "x", "bad": float("nan")}
    assert scalars(record) == {"loss": 2.5, "n": 7.0}


def test_tensorboard_sink_writes_events_readable_back(tmp_path):
    pytest.importorskip("tensorboard")
    sinks = make_sinks(OmegaConf.structured(LoggingConfig(tensorboard=True)), tmp_path)
    assert [type(s) for s in sinks] == [TensorBoardSink]
    for record in RECORDS:
        sinks[0].log(record)
    sinks[0].close()
    assert list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    got = read_scalars(tmp_path / TENSORBOARD_DIR)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], value))
    assert got.keys() == expected.keys()
    for key in expected:
        steps = [s for s, _ in got[key]]
        assert steps == [s for s, _ in expected[key]]
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-6)


def test_default_config_makes_no_sinks(tmp_path):
    assert make_sinks(None, tmp_path) == []
    assert make_sinks(LoggingConfig(), tmp_path) == []
    assert make_sinks({}, tmp_path) == []
    assert not any(tmp_path.iterdir())


def test_sinks_are_off_by_default():
    assert LoggingConfig().tensorboard is False and LoggingConfig().wandb is False
    assert make_sinks(LoggingConfig(), "unused") == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_requested_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(MuonGPTError, match="wandb is not installed"):
        make_sinks({"wandb": True}, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_sink_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = make_sinks({"wandb": True, "wandb_mode": "offline"}, tmp_path, run_config={"a": 1})
    for record in RECORDS:
        sinks[0].log(record)
    sinks[0].close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_bad_wandb_mode(tmp_path):
    with pytest.raises(MuonGPTError, match="wandb_mode"):
        make_sinks({"wandb": True, "wandb_mode": "cloud"}, tmp_path)
