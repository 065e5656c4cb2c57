"""Multi-GPU scaling: tokens/s per GPU, exposed communication and optimizer memory at 1, 2, 4 GPUs.

    python benchmarks/scaling.py --out benchmarks/results/scaling.json            # one 4-GPU call
    python benchmarks/scaling.py --models d12 --gpus 1,2 --compile blocks --out /tmp/s.json
    python benchmarks/scaling.py --device cpu --models tiny --gpus 1,2 --compile none \\
        --micro-batch 2 --seq-len 64 --steps 2 --warmup 1 --out /tmp/scaling_cpu.json  # smoke test

The launcher runs ``torchrun --standalone --nproc_per_node N`` of this file for every model and N
in turn (N larger than the visible GPUs is skipped). Each run trains the model the way the trainer
does (bf16 autocast, the config's Muon + AdamW hybrid, sharded when N > 1, gradients reduced
during the last micro-step's backward) on random tokens, with:

- the same per-GPU micro-batch (``--micro-batch`` x ``--seq-len``) at every N, and the same
  global batch (``--batch-size`` sequences, default micro-batch x largest N): gradient
  accumulation is largest N / N micro-steps. Per token, a GPU then does the same forward,
  backward and (sharded) optimizer work at every N; only communication is added.
- tokens/s per GPU over ``--steps`` timed steps (after ``--warmup`` steps, compilation included
  there), the slowest rank's time; efficiency = tokens/s per GPU / the same model's at 1 GPU.
- exposed communication: the same steps timed again with every collective of the sharded
  optimizers replaced by its local part (``Comm.local_only``; the weights go wrong, the work
  stays the same), per step: time with communication - time without. What overlaps with compute
  does not count.
- optimizer state per GPU (bytes of momentum / moments this rank holds; the largest rank) and
  the peak CUDA memory.

``--compile``: the trainer's ``training.compile_mode``: ``model`` (default; ``torch.compile(model)``:
the backward is then one compiled autograd node, so the reductions start when all of it is done
and overlap only the optimizer's own work), ``blocks`` (each transformer block and the head
compiled on their own, so a block's gradients are reduced while the blocks before it still run
backward), or ``none``; a comma list
(``model,blocks``) runs each. Results go to ``--out`` (JSON); a table is printed last.
``--budget-s`` skips the runs that would not finish in time (default 540 s: one 10-minute call
holds d12 and d24 at 1, 2 and 4 GPUs with one compile mode; the compile cache is shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from timing import seconds_per_step
from torchrun_workers import compose_config, run_workers


# ---------------------------------------------------------------- worker (one torchrun rank)
def build(model_name: str, overrides: list[str]):
    return compose_config([f"model/size={model_name}", *overrides])


def worker(args) -> None:
    import torch.distributed as dist

    from muongpt.config import model_config
    from muongpt.model import build_model
    from muongpt.optim import build_optimizer
    from muongpt.optim.distributed import distribute, optimizer_state_bytes
    from muongpt.train.distributed import init_distributed
    from muongpt.train.trainer import compile_model

    ctx = init_distributed(args.device)
    W, device = ctx.world_size, ctx.device
    cfg = build(args.model, args.override)
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model)).to(device)
    optimizer = build_optimizer(model, cfg.optimizer)
    if W > 1:
        optimizer = distribute(optimizer, model)
    forward = model if args.compile == "none" else compile_model(model, args.compile)
    per_step = args.micro_batch * W
    if args.batch_size % per_step:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {per_step}")
    accum = args.batch_size // per_step
    B, T = args.micro_batch, args.seq_len
    g = torch.Generator().manual_seed(1 + ctx.rank)
    data = torch.randint(0, 50257, (accum, 2, B, T), generator=g).to(device)
    use_bf16 = device.type == "cuda"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        for i in range(accum):
            with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                loss = forward(data[i, 0], data[i, 1])
            if i == accum - 1:
                optimizer.reduce_during_next_backward()
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(steps: int) -> float:  # seconds per step, the slowest rank's
        return seconds_per_step(train_step, steps, device, distributed=W > 1)

    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    local_step_s = step_s
    if W > 1:
        optimizer.comm.local_only = True
        train_step()  # the first local-only step settles the caches
        local_step_s = timed(args.steps)
        optimizer.comm.local_only = False
    stats = torch.tensor([optimizer_state_bytes(optimizer), peak], dtype=torch.float64)
    if W > 1:
        stats = stats.to(device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    tokens_per_gpu_step = accum * B * T
    result = {
        "model": args.model,
        "gpus": W,
        "compile": args.compile,
        "micro_batch": B,
        "seq_len": T,
        "grad_accum": accum,
        "global_batch_tokens": args.batch_size * T,
        "params": model.num_params(),
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_without_communication": round(local_step_s * 1e3, 2),
        "exposed_comm_ms": round(max(step_s - local_step_s, 0.0) * 1e3, 2),
        "tokens_per_s_per_gpu": round(tokens_per_gpu_step / step_s, 1),
        "optimizer_state_bytes_per_gpu": int(stats[0]),
        "peak_memory_bytes": int(stats[1]),
        "warmup_s": round(warmup_s, 1),
        "optimizer": optimizer.summary().splitlines()[0],
    }
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result))
    if W > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------- launcher
def launch(args, model: str, gpus: int, compile_mode: str, batch_size: int) -> dict:
    argv = [
        f"--model={model}",
        f"--compile={compile_mode}",
        f"--device={args.device}",
        f"--micro-batch={args.micro_batch}",
        f"--seq-len={args.seq_len}",
        f"--batch-size={batch_size}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        *(f"--override={o}" for o in args.override),
    ]
    out, error = run_workers(__file__, gpus, argv, args.run_timeout_s)
    return out or {"model": model, "gpus": gpus, "compile": compile_mode, "error": error}


def add_efficiency(results: list[dict]) -> None:
    base = {
        (r["model"], r["compile"]): r for r in results if r.get("gpus") == 1 and "error" not in r
    }
    for r in results:
        b = base.get((r["model"], r["compile"]))
        if b is not None and "error" not in r:
            r["efficiency"] = round(r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"], 4)
            r["optimizer_state_vs_1_gpu"] = round(
                r["optimizer_state_bytes_per_gpu"] / b["optimizer_state_bytes_per_gpu"], 4
            )


def table(results: list[dict]) -> str:
    head = (
        f"{'model':<6} {'compile':<7} {'gpus':>4} {'accum':>5} {'tok/s/GPU':>11} {'eff':>6} "
        f"{'step ms':>8} {'exposed comm':>14} {'opt state/GPU':>14} {'peak mem':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(
                f"{r['model']:<6} {r['compile']:<7} {r['gpus']:>4}  failed: "
                f"{r['error'][-60:].strip()}"
            )
            continue
        eff = f"{100 * r['efficiency']:.1f}%" if "efficiency" in r else "-"
        comm = f"{r['exposed_comm_ms']:.2f} ms {100 * r['exposed_comm_ms'] / r['step_ms']:>3.0f}%"
        lines.append(
            f"{r['model']:<6} {r['compile']:<7} {r['gpus']:>4} {r['grad_accum']:>5} "
            f"{r['tokens_per_s_per_gpu']:>11,.0f} {eff:>6} {r['step_ms']:>8.1f} {comm:>14} "
            f"{r['optimizer_state_bytes_per_gpu'] / 2**30:>10.3f} GiB "
            f"{r['peak_memory_bytes'] / 2**30:>5.1f} GiB"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    p.add_argument("--models", default="d12,d24", help="model/gpt sizes, comma separated")
    p.add_argument("--gpus", default="1,2,4", help="world sizes, comma separated")
    p.add_argument("--compile", default="model", help="model | blocks | none, or a list")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu: gloo smoke test)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU per micro-step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="global sequences per step (default: micro-batch x largest N)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip runs past this time")
    p.add_argument("--run-timeout-s", type=float, default=300.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    gpus = sorted({int(n) for n in args.gpus.split(",")})
    if args.device != "cpu":
        visible = torch.cuda.device_count()
        if visible == 0:
            raise SystemExit("no CUDA GPU visible (use --device cpu for a smoke test)")
        skipped = [n for n in gpus if n > visible]
        gpus = [n for n in gpus if n <= visible]
        if skipped:
            print(f"skipping {skipped} GPUs: only {visible} visible", file=sys.stderr)
    batch_size = args.batch_size or args.micro_batch * max(gpus)
    runs = [
        (m, c, n) for m in args.models.split(",") for c in args.compile.split(",") for n in gpus
    ]
    results, start = [], time.perf_counter()
    for i, (model, compile_mode, n) in enumerate(runs):
        elapsed = time.perf_counter() - start
        done = [r["wall_s"] for r in results if "wall_s" in r]
        expected = max(done) if done else 0.0
        if elapsed + expected > args.budget_s:
            print(f"budget: skipping {len(runs) - i} remaining runs", file=sys.stderr)
            results += [
                {"model": m, "gpus": k, "compile": c, "error": "skipped (budget)"}
                for m, c, k in runs[i:]
            ]
            break
        r = launch(args, model, n, compile_mode, batch_size)
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    add_efficiency(results)
    info = {
        "benchmark": "scaling",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor(),
        "visible_gpus": torch.cuda.device_count(),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "model", "result")
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2))
    print(f"wrote {args.out}")
    print(table(results))


if __name__ == "__main__":
    main()
