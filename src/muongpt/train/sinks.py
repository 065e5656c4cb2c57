"""Logging sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases, both off by default.

The trainer builds them once on the main rank and hands every metrics record to each sink:

    sinks = make_sinks(cfg.logging, run_dir, run_config=OmegaConf.to_container(cfg, resolve=True))
    for sink in sinks: sink.log(record)      # record = {"step": 10, "train_loss": 4.2, ...}
    for sink in sinks: sink.close()

A record's numeric values become scalars at ``step=record["step"]``; other values (strings, None,
lists) are skipped. ``metrics.jsonl`` stays the source of truth: the sinks only mirror it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from muongpt import MuonGPTError
from muongpt.config import LoggingConfig

WANDB_MODES = ("offline", "online", "disabled")
TENSORBOARD_DIR = "tensorboard"  # inside the run directory


def scalars(record: dict) -> dict[str, float]:
    """The loggable scalars of a record: finite ints and floats other than ``step``, no bools."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Sink:
    """Receives every metrics record; ``close`` flushes whatever the sink buffers."""

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MuonGPTError(
                f"logging.tensorboard=true but TensorBoard is not importable ({e}); "
                "install it with `pip install tensorboard`"
            ) from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink(Sink):
    def __init__(
        self,
        run_dir: str | Path,
        project: str,
        mode: str = "offline",
        name: str | None = None,
        config: dict | None = None,
    ):
        if mode not in WANDB_MODES:
            raise MuonGPTError(f"logging.wandb_mode must be one of {WANDB_MODES}, got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise MuonGPTError(
                "logging.wandb=true but wandb is not installed; `pip install wandb` "
                "or set logging.wandb=false"
            ) from None
        self.run = wandb.init(
            project=project, mode=mode, dir=str(run_dir), name=name, config=config
        )

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def make_sinks(
    cfg_logging: Any,
    run_dir: str | Path,
    run_config: dict | None = None,
    run_name: str | None = None,
) -> list[Sink]:
    """Build the sinks that ``cfg_logging`` (a LoggingConfig, DictConfig, dict or None) asks for.

    Call it on the main rank only. ``run_config`` (the resolved config as a plain dict) and
    ``run_name`` are passed on to Weights & Biases.
    """
    if cfg_logging is None:
        return []
    if isinstance(cfg_logging, dict):
        cfg_logging = LoggingConfig(**cfg_logging)

    def get(name: str):
        return getattr(cfg_logging, name)

    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    if get("tensorboard"):
        sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR))
    if get("wandb"):
        sinks.append(
            WandbSink(
                run_dir,
                project=get("wandb_project"),
                mode=get("wandb_mode"),
                name=run_name or run_dir.name,
                config=run_config,
            )
        )
    return sinks
