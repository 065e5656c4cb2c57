"""Checkpoint files: atomic writes, keeping the newest K, safe loading, resume lookup, exports."""

from __future__ import annotations

import builtins
import json
import pickle
import random

import numpy as np
import pytest
import torch

from muongpt.train import checkpoint as ckpt
from muongpt.train import resilience


def state(step: int, value: float = 0.0) -> dict:
    """A small stand-in for a Trainer.state_dict()."""
    return {
        "format": ckpt.CHECKPOINT_FORMAT,
        "model": {"w": torch.full((3, 4), value), "b": torch.arange(4.0)},
        "optimizer": {"kinds": ["AdamW"], "optimizers": [{"state": {}, "param_groups": []}]},
        "loader": {"version": 1, "position": step * 10},
        "step": step,
        "tokens_seen": step * 10,
        "config": {"model": {"gpt": {"n_layer": 2}}},
    }


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears if and only if it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_save_load_roundtrip_and_names(tmp_path):
    path = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 7), state(7, 1.5))
    assert path == tmp_path / "checkpoints" / "step_000007.pt" and ckpt.step_of(path) == 7
    loaded = ckpt.load_resumable(path)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 4), 1.5))
    assert loaded["step"] == 7 and loaded["config"] == state(7)["config"]
    assert list((tmp_path / "checkpoints").iterdir()) == [path]  # no temporary left


def test_a_crash_during_a_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "checkpoints" / "step_000001.pt", state(1, 1.0))
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:  # leave a torn file behind, as a power cut would
            handle.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(path, state(2, 2.0))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert list(path.parent.iterdir()) == [path]


def test_list_and_prune_keep_the_newest(tmp_path):
    for step in (3, 12, 7, 100):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), state(step))
    folder = tmp_path / "checkpoints"
    stale = folder / ".step_000200.pt.tmp-999999"  # left by a killed save
    stale.write_bytes(b"partial")
    (folder / "notes.txt").write_text("mine")
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [3, 7, 12, 100]
    assert ckpt.list_checkpoints(folder) == ckpt.list_checkpoints(tmp_path)
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [12, 100]
    assert not stale.exists() and (folder / "notes.txt").exists()
    ckpt.prune_checkpoints(tmp_path, keep=0)  # 0 keeps all
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = ckpt.checkpoint_path(tmp_path, 5)
    evil.parent.mkdir(parents=True)
    torch.save({"model": Payload(marker), "config": {}}, evil)
    raw = tmp_path / "raw.pt"  # a plain pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"model": Payload(marker), "config": {}}))

    for path in (evil, raw):
        with pytest.raises(ckpt.CheckpointError, match="refused: .*arbitrary unpickling") as info:
            ckpt.load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()

    # resume=auto skips it, with a warning, for the older good checkpoint.
    good = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 4), state(4))
    warnings = []
    path, loaded = ckpt.find_resume_checkpoint("auto", tmp_path, warn=warnings.append)
    assert path == good and loaded["step"] == 4
    assert len(warnings) == 1 and "refused" in warnings[0] and "io.open" in warnings[0]
    assert not marker.exists()

    # The control: an unrestricted unpickler does run it, so the test above could fail.
    torch.load(evil.with_name(evil.name + ".unreadable"), weights_only=False)
    assert marker.exists()


def test_truncated_newest_is_skipped_with_a_warning(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), state(step))
    newest = ckpt.checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="unreadable or truncated"):
        ckpt.load_checkpoint(newest)
    warnings = []
    path, loaded = ckpt.find_resume_checkpoint("auto", tmp_path, warn=warnings.append)
    assert path == ckpt.checkpoint_path(tmp_path, 4) and loaded["step"] == 4
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated" in warnings[0]
    assert newest.with_name("step_000006.pt.unreadable").exists()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_resume_argument_forms(tmp_path):
    assert ckpt.find_resume_checkpoint("none", tmp_path) is None
    assert ckpt.find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: start fresh
    path = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 3), state(3))
    for given in (str(path), str(tmp_path), str(tmp_path / "checkpoints")):
        assert ckpt.find_resume_checkpoint(given, tmp_path / "elsewhere")[0] == path
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file or run directory"):
        ckpt.find_resume_checkpoint(str(tmp_path / "missing.pt"), tmp_path)
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": {}}, weights_only)
    with pytest.raises(ckpt.CheckpointError, match="lacks optimizer, loader, step, tokens_seen"):
        ckpt.find_resume_checkpoint(str(weights_only), tmp_path)
    all_bad = tmp_path / "bad_run"
    ckpt.checkpoint_path(all_bad, 1).parent.mkdir(parents=True)
    ckpt.checkpoint_path(all_bad, 1).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="no loadable checkpoint"):
        ckpt.find_resume_checkpoint("auto", all_bad, warn=lambda message: None)


def test_rng_states_roundtrip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    saved = {**state(1), "rng": resilience.capture_rng_state(torch.device("cpu"))}
    draws = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    path = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), saved)

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    resilience.restore_rng_state(ckpt.load_checkpoint(path)["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(5), draws[0])
    assert np.array_equal(np.random.rand(5), draws[1])
    assert [random.random() for _ in range(5)] == draws[2]


def test_config_differences_split_model_from_other_settings(tmp_path):
    saved = {
        "model": {"name": "gpt", "n_layer": 4, "n_embd": 128, "mixing": {"pattern": ["attention"]}},
        "kernels": {"converters": []},
        "training": {"max_steps": 100, "resume": "none", "lr": 1.0},
    }
    requested = json.loads(json.dumps(saved))
    requested["model"]["n_layer"] = 6
    requested["kernels"]["converters"] = ["fp8_head"]  # numerics of the head, not the weights
    requested["model"]["rope_base"] = 500.0  # a setting added since: listed, not refused
    requested["model"]["mixing"]["pattern"] = ["pom"]
    requested["training"].update(max_steps=200, resume="auto")
    del requested["training"]["lr"]  # a setting removed since: listed as a change
    arch, other, added = resilience.config_differences(saved, requested)
    assert arch == [
        "model.mixing.pattern (checkpoint ['attention'], requested ['pom'])",
        "model.n_layer (checkpoint 4, requested 6)",
    ]
    assert other == [
        "kernels.converters (checkpoint [], requested ['fp8_head'])",
        "training.lr (checkpoint 1.0, requested '<absent>')",
        "training.max_steps (checkpoint 100, requested 200)",
    ]
    assert added == ["model.rope_base = 500.0"]
    with pytest.raises(resilience.ConfigMismatchError, match="model.n_layer"):
        resilience.check_resume_config(saved, requested, tmp_path / "x.pt", log=print)
    logged = []
    requested["model"]["n_layer"] = 4
    requested["model"]["mixing"]["pattern"] = ["attention"]
    resilience.check_resume_config(saved, requested, tmp_path / "x.pt", log=logged.append)
    assert logged == [
        f"resuming with changed settings: {'; '.join(other)}",
        "settings newer than the checkpoint, used as requested: model.rope_base = 500.0",
    ]


def test_truncate_metrics_drops_later_records_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train_loss": 10.0 - s}) for s in range(11)]
    path.write_text("\n".join(lines) + '\n{"step": 11, "train_lo')
    assert resilience.truncate_metrics(path, 6) == 5
    assert path.read_text() == "\n".join(lines[:7]) + "\n"
    assert resilience.truncate_metrics(path, 6) == 0
    assert resilience.truncate_metrics(tmp_path / "absent.jsonl", 6) == 0


def test_safetensors_export_roundtrip(tmp_path):
    weights = state(9, 0.25)["model"]
    weights["view"] = weights["b"][:2]  # shares memory with "b"; safetensors needs copies
    out = ckpt.export_safetensors(weights, tmp_path / "model.safetensors", {"step": 9, "n": [1]})
    loaded, meta = ckpt.read_export(out)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert meta == {"step": 9, "n": [1]}
    assert out.stat().st_mode & 0o777 == 0o644

    path = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 9), state(9, 0.25))
    exported = ckpt.export_checkpoint(path)
    assert exported == path.with_name(ckpt.EXPORT_NAME)
    loaded, meta = ckpt.read_export(exported)
    assert torch.equal(loaded["w"], torch.full((3, 4), 0.25))
    s = state(9)
    assert meta == {"step": 9, "tokens_seen": s["tokens_seen"], "config": s["config"]}
