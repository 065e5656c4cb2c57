"""One full speed run (training + final validation) of an experiment; writes a JSON summary.

    python benchmarks/speedrun.py --out benchmarks/results/x.json experiment=speedrun_bench \
        data.train_files=.devdata/bench/train_*.bin data.val_files=.devdata/bench/val_*.bin

Everything after the options is a Hydra override. Prints a one-line table row last. The training
time is the trainer's ``train_seconds`` (the GPU synchronised before the clock stops at every
step where it is read, the last included; compilation excluded when the experiment sets
``training.compile_warmup_steps``). MFU: see ``muongpt.cli.bench.MFU_FORMULA``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from muongpt import atomic_write
from muongpt.cli.bench import (
    MFU_FORMULA,
    compose_config,
    flops_per_token,
    peak_flops,
    sample_training_rows,
)


def evaluate_extended(trainer, cfg, factor: float) -> float:
    """The trained weights' val loss under ``model.eval_window_factor=factor``: a copy of the
    model built with that option (same converters, compiled as in training) evaluated in the
    trainer's place; the trainer's own model is put back afterwards."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from muongpt.kernels.converters import KernelsConfig, apply_converters
    from muongpt.model import build_model
    from muongpt.train.trainer import compile_model

    model = build_model(replace(trainer.model_config, eval_window_factor=factor))
    apply_converters(model, KernelsConfig(**OmegaConf.to_container(cfg.kernels)))
    model.load_state_dict(trainer.model.state_dict())
    model.to(trainer.device)
    model.current_window.copy_(trainer.model.current_window)
    saved = trainer.model, trainer.forward
    trainer.model = model
    trainer.forward = (
        compile_model(model, cfg.training.compile_mode, cfg.training.inductor)
        if cfg.training.compile
        else model
    )
    try:
        return trainer.evaluate()
    finally:
        trainer.model, trainer.forward = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="")
    ap.add_argument(
        "--eval-windows",
        default="",
        help="comma-separated flex windows (tokens) to re-evaluate the trained model at",
    )
    ap.add_argument(
        "--eval-factors",
        default="",
        help="comma-separated model.eval_window_factor values (YaRN window extension) to "
        "re-evaluate the trained model at",
    )
    args, overrides = ap.parse_known_args()
    from muongpt.train.trainer import Trainer

    cfg = compose_config(overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="muongpt-speedrun-") as run_dir:
        cfg.training.save_checkpoints = False  # its 4.9 GB state (d12) is not wanted here
        trainer = Trainer(cfg, run_dir)
        build_seconds = time.perf_counter() - start
        eval_seconds = 0.0  # every evaluation: step 0's, the final one, any re-scoring
        evaluate = trainer.evaluate

        def timed_evaluate() -> float:
            nonlocal eval_seconds
            t0 = time.perf_counter()
            loss = evaluate()
            eval_seconds += time.perf_counter() - t0
            return loss

        trainer.evaluate = timed_evaluate
        summary = trainer.run()
        metrics = [
            json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        window_losses = {}
        for window in filter(None, args.eval_windows.split(",")):
            trainer.model.set_attn_window(int(window))
            window_losses[window] = trainer.evaluate()
            print(f"val loss at window {window}: {window_losses[window]:.4f}")
        factor_losses = {}
        for factor in filter(None, args.eval_factors.split(",")):
            factor_losses[factor] = evaluate_extended(trainer, cfg, float(factor))
            print(f"val loss at eval_window_factor {factor}: {factor_losses[factor]:.4f}")
        rows = sample_training_rows(trainer)  # for the document-masked attention FLOPs
        trainer.close()
    if "final_val_loss" not in summary:  # stopped early (SIGTERM, e.g. a time limit)
        print(f"INTERRUPTED {args.name or cfg.experiment_name}: {summary}", file=sys.stderr)
        return 75
    steps, secs = summary["steps"], summary["train_seconds"]
    tok_s = summary["tokens"] / secs
    fpt = flops_per_token(trainer.model, cfg.training.seq_len, rows)
    result = {
        "name": args.name or cfg.experiment_name,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "tokens": summary["tokens"],
        "train_seconds": secs,
        "ms_per_step": 1e3 * secs / steps,
        "tokens_per_s": tok_s,
        "flops_per_token": fpt,
        "mfu_formula": MFU_FORMULA,
        "peak_flops": peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None,
        "val_loss": summary["final_val_loss"],
        "val_loss_at_window": window_losses,
        "val_loss_at_eval_window_factor": factor_losses,
        "wall_seconds_total": time.perf_counter() - start,
        # where the rest of the wall time went: the trainer's construction (model, optimizer,
        # data), the compile warm-up, the evaluations (step 0's and the final one)
        "build_seconds": round(build_seconds, 2),
        "warmup_seconds": summary.get("warmup_seconds"),
        "eval_seconds": round(eval_seconds, 2),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "train_loss_curve": [
            (m["step"], round(m["train_loss"], 4)) for m in metrics if "train_loss" in m
        ],
        # (step, training seconds so far (compilation excluded), val loss) at each evaluation
        "val_loss_curve": [
            (m["step"], m.get("elapsed_s"), round(m["val_loss"], 4))
            for m in metrics
            if "val_loss" in m
        ],
    }
    result["mfu"] = fpt * tok_s / result["peak_flops"] if result["peak_flops"] else None
    # whole or absent: the device scripts copy every JSON while other runs may still write theirs
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(args.out, lambda tmp: tmp.write_text(text))
    print(
        f"RESULT {result['name']}: val {result['val_loss']:.4f}  train {secs:.1f} s  "
        f"{result['ms_per_step']:.1f} ms/step  {tok_s:,.0f} tok/s  MFU "
        + (f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a")
    )
    print(
        f"wall {result['wall_seconds_total']:.1f} s: build {result['build_seconds']:.1f} s, "
        f"compile warm-up {result['warmup_seconds'] or 0.0:.1f} s, "
        f"evaluations {result['eval_seconds']:.1f} s, "
        f"training {secs:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
