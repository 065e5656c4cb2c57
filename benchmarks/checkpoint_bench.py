"""Save and load time and size of a full training checkpoint (model + optimizers), d12 by default.

    python benchmarks/checkpoint_bench.py --out benchmarks/results/checkpoint_d12_cuda.json
    python benchmarks/checkpoint_bench.py --device cpu --out benchmarks/results/checkpoint_d12_cpu.json
    python benchmarks/checkpoint_bench.py --device cpu --size tiny --out /tmp/ckpt.json  # smoke test

The model and optimizer are built from the experiment's config (default ``speedrun_d12``: GPT d12
with the Muon hybrid, Muon for the block matrices and AdamW for embedding, head and scalars). One
optimizer step on fixed random gradients creates the optimizer state (Muon momentum, AdamW
moments), then the checkpoint holds what ``Trainer.state_dict()`` holds: weights, both optimizer
states, loader position, RNG states, counters and the resolved config.

Timed, ``--repeats`` times each (median reported):
- save:    ``checkpoint.save_checkpoint``: torch.save to a temporary file (device -> host copies
           included), fsync, rename, fsync of the folder
- load:    ``checkpoint.load_checkpoint``: torch.load(weights_only=True) to CPU tensors
- restore: the loaded state put back into the model and optimizer on the device
- export:  ``checkpoint.export_safetensors`` of the weights alone (fsynced too)
Loads read a file this process just wrote, so they come from the page cache: a cold read from a
network disk is slower. ``--dir`` picks the folder written to (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from muongpt.config import model_config
from muongpt.model import build_model
from muongpt.optim import build_optimizer
from muongpt.train import checkpoint as ckpt
from muongpt.train.resilience import capture_rng_state


def compose(experiment: str, size: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name="config", overrides=[f"experiment={experiment}", f"model/size={size}"]
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--experiment", default="speedrun_d12")
    parser.add_argument("--size", default="d12", help="model/gpt size: tiny, d12, d24, ...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder to write checkpoints in")
    parser.add_argument("--out", default="benchmarks/results/checkpoint_bench.json")
    args = parser.parse_args()
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)

    cfg = compose(args.experiment, args.size)
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model)).to(device)
    optimizer = build_optimizer(model, cfg.optimizer)
    kinds = [type(opt).__name__ for opt in optimizer.optimizers]
    generator = torch.Generator(device="cpu").manual_seed(1)
    for p in model.parameters():  # fixed random gradients, then one step: the state exists
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device, p.dtype)
    optimizer.apply_schedule(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)

    def state_dict() -> dict:  # what Trainer.state_dict() holds
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loader": {"version": 1, "epoch": 0, "position": 123456, "tokens_consumed": 123456},
            "step": 1,
            "tokens_seen": 131072,
            "train_seconds": 1.0,
            "rng": capture_rng_state(device),
            "bad_steps": 0,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="muongpt-ckpt-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = ckpt.checkpoint_path(folder, 1)
    export = path.with_name(ckpt.EXPORT_NAME)
    try:
        save_s, _ = timed(lambda: ckpt.save_checkpoint(path, state_dict()), device, args.repeats)
        load_s, loaded = timed(lambda: ckpt.load_checkpoint(path), device, args.repeats)

        def restore() -> None:
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])

        restore_s, _ = timed(restore, device, args.repeats)
        export_s, _ = timed(
            lambda: ckpt.export_safetensors(model.state_dict(), export, {"step": 1}),
            device,
            args.repeats,
        )
        file_bytes, export_bytes = path.stat().st_size, export.stat().st_size
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    result = {
        "benchmark": "checkpoint",
        "experiment": args.experiment,
        "size": args.size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "optimizers": kinds,
        "parameters": model.num_params(),
        "repeats": args.repeats,
        "model_bytes": tensor_bytes(loaded["model"]),
        "optimizer_bytes": tensor_bytes(loaded["optimizer"]),
        "checkpoint_bytes": file_bytes,
        "safetensors_bytes": export_bytes,
        "save_s": statistics.median(save_s),
        "load_s": statistics.median(load_s),
        "restore_s": statistics.median(restore_s),
        "export_s": statistics.median(export_s),
        "save_s_all": save_s,
        "load_s_all": load_s,
        "restore_s_all": restore_s,
        "export_s_all": export_s,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    gib = 2**30
    print(f"checkpoint of {args.size} ({result['parameters']:,} parameters), "
          f"{' + '.join(kinds)}, device {device}; median of {args.repeats}")  # fmt: skip
    print(f"{'what':<34}{'size GiB':>10}{'seconds':>10}{'GiB/s':>8}")
    rows = [
        ("save (torch.save + fsync + rename)", file_bytes, result["save_s"]),
        ("load (weights_only, to CPU)", file_bytes, result["load_s"]),
        ("restore (into model + optimizer)", file_bytes, result["restore_s"]),
        ("export model.safetensors", export_bytes, result["export_s"]),
    ]
    for what, size, seconds in rows:
        print(f"{what:<34}{size / gib:>10.3f}{seconds:>10.3f}{size / gib / seconds:>8.2f}")
    print(f"  of which weights {result['model_bytes'] / gib:.3f} GiB, "
          f"optimizer state {result['optimizer_bytes'] / gib:.3f} GiB; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
