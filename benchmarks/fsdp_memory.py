"""Replicated vs FSDP2 training: memory per GPU and tokens/s, and the largest model each mode fits.

    python benchmarks/fsdp_memory.py --out /tmp/fsdp.json                      # d24, d48 on 2 GPUs
    python benchmarks/fsdp_memory.py --largest 48x2048,48x3072,48x4096 --out /tmp/fsdp.json
    python benchmarks/fsdp_memory.py --device cpu --models tiny --gpus 2 --micro-batch 2 \\
        --seq-len 64 --steps 2 --warmup 1 --out /tmp/fsdp_cpu.json           # smoke test

For every model and mode (``--modes replicate,fsdp``) the launcher runs ``torchrun --standalone
--nproc_per_node N`` of this file. Each run trains as the trainer does (the Muon + AdamW hybrid
of ``experiment=speedrun_d12``, bf16 autocast on CUDA; ``replicate``: whole model on every GPU,
sharded optimizers; ``fsdp``: ``training.parallel=fsdp``, FSDP2 with bf16 compute and fp32
master weights) on random tokens at ``--micro-batch`` x ``--seq-len`` per GPU, and reports per
GPU (the largest rank):

- ``params_bytes``: the parameters this GPU holds between steps (fp32; FSDP: its shards);
- ``grads_bytes``: the gradients it holds after a backward that does not reduce yet (a
  gradient-accumulation micro-step; FSDP: its reduce-scattered shards);
- ``optimizer_state_bytes``: momentum / moments it holds after a step;
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` over the timed steps (activations,
  gathered parameters and communication buffers included);
- ``tokens_per_s_per_gpu`` over ``--steps`` timed steps after ``--warmup`` steps.

``--largest LxE,...`` (layers x width, heads of 128 dims) tries each shape in order in each mode
with 2 steps and records ``fits`` true/false (false: CUDA out of memory); a mode stops at its
first failure. Results go to ``--out`` (JSON); a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from timing import seconds_per_step
from torchrun_workers import compose_config, run_workers


# ---------------------------------------------------------------- worker (one torchrun rank)
def build(model_name: str, overrides: list[str]):
    size = [f"model/size={model_name}"] if "x" not in model_name else shape(model_name)
    return compose_config([*size, *overrides])


def shape(name: str) -> list[str]:
    layers, width = (int(v) for v in name.split("x"))
    return [f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={width // 128}"]


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def worker(args) -> None:
    import torch.distributed as dist

    from muongpt.config import model_config
    from muongpt.model import build_model
    from muongpt.optim import build_optimizer
    from muongpt.optim.distributed import distribute, optimizer_state_bytes
    from muongpt.optim.fsdp import fsdp_optimizer
    from muongpt.train.distributed import init_distributed
    from muongpt.train.fsdp import shard_model
    from muongpt.train.trainer import compile_model

    ctx = init_distributed(args.device)
    W, device = ctx.world_size, ctx.device
    cfg = build(args.model, args.override)
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model))  # on the CPU: FSDP moves only its shards
    if args.mode == "fsdp":
        shard_model(model, device, bf16=True)
        model.to(device)
        optimizer = fsdp_optimizer(build_optimizer(model, cfg.optimizer))
    else:
        model.to(device)
        optimizer = build_optimizer(model, cfg.optimizer)
        if W > 1:
            optimizer = distribute(optimizer, model)
    forward = model if args.compile == "none" else compile_model(model, args.compile)
    B, T = args.micro_batch, args.seq_len
    g = torch.Generator().manual_seed(1 + ctx.rank)
    data = torch.randint(0, 50257, (2, B, T), generator=g).to(device)
    use_bf16 = device.type == "cuda"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def backward(reduce: bool) -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            loss = forward(data[0], data[1])
        if reduce:
            optimizer.reduce_during_next_backward()
        loss.backward()

    def train_step() -> None:
        backward(reduce=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(steps: int) -> float:  # seconds per step, the slowest rank's
        return seconds_per_step(train_step, steps, device, distributed=W > 1)

    params = list(model.parameters())
    try:
        backward(reduce=False)  # an accumulation micro-step: the gradients it leaves behind
        grads_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.warmup):
            train_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_s = timed(args.steps)
        fits = True
    except torch.OutOfMemoryError:
        fits, step_s, grads_bytes = False, float("nan"), 0
    if fits and args.mode == "fsdp":
        state_bytes = sum(
            local_bytes(v for v in s.values() if isinstance(v, torch.Tensor))
            for opt in optimizer.optimizers
            for s in opt.state.values()
        )
    elif fits:
        state_bytes = optimizer_state_bytes(optimizer)
    else:
        state_bytes = 0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    stats = torch.tensor(
        [local_bytes(params), grads_bytes, state_bytes, peak, int(not fits)], dtype=torch.float64
    )
    if W > 1:
        stats = stats.to(device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    result = {
        "model": args.model,
        "mode": args.mode,
        "gpus": W,
        "compile": args.compile,
        "micro_batch": B,
        "seq_len": T,
        "params": model.num_params(),
        "fits": not bool(stats[4]),
        "params_bytes": int(stats[0]),
        "grads_bytes": int(stats[1]),
        "optimizer_state_bytes": int(stats[2]),
        "peak_memory_bytes": int(stats[3]),
        "step_ms": round(step_s * 1e3, 2),
        "tokens_per_s_per_gpu": round(B * T / step_s, 1) if fits else 0.0,
    }
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result))
    if W > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------- launcher
def launch(args, model: str, mode: str, steps: int, warmup: int) -> dict:
    argv = [
        f"--model={model}",
        f"--mode={mode}",
        f"--compile={args.compile}",
        f"--device={args.device}",
        f"--micro-batch={args.micro_batch}",
        f"--seq-len={args.seq_len}",
        f"--steps={steps}",
        f"--warmup={warmup}",
        *(f"--override={o}" for o in args.override),
    ]
    # a rank out of memory leaves the others in a collective: let it time out, not hang
    env = {"MUONGPT_DIST_TIMEOUT_S": "120"}
    out, error = run_workers(__file__, args.gpus, argv, args.run_timeout_s, env)
    return out or {"model": model, "mode": mode, "fits": False, "error": error}


def table(results: list[dict]) -> str:
    gib = 2**30
    head = (
        f"{'model':<9} {'mode':<9} {'params':>8} {'fits':>4} {'param GiB':>9} {'grad GiB':>8} "
        f"{'opt GiB':>7} {'peak GiB':>8} {'tok/s/GPU':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<9} {r['mode']:<9} failed: {r['error'][-60:].strip()}")
            continue
        lines.append(
            f"{r['model']:<9} {r['mode']:<9} {r['params'] / 1e9:>7.2f}B {'yes' if r['fits'] else 'no':>4} "
            f"{r['params_bytes'] / gib:>9.2f} {r['grads_bytes'] / gib:>8.2f} "
            f"{r['optimizer_state_bytes'] / gib:>7.2f} {r['peak_memory_bytes'] / gib:>8.2f} "
            f"{r['tokens_per_s_per_gpu']:>10,.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_memory.json"))
    p.add_argument("--models", default="d24,d48", help="model/gpt sizes or LxE shapes, comma list")
    p.add_argument("--modes", default="replicate,fsdp")
    p.add_argument("--largest", default="", help="LxE shapes to try in order (fits or OOM)")
    p.add_argument("--gpus", type=int, default=2, help="ranks (GPUs) per run")
    p.add_argument("--compile", default="none", help="none | blocks (the FSDP compile mode)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu: gloo smoke test)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--run-timeout-s", type=float, default=300.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device != "cpu" and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs visible")
    modes = args.modes.split(",")
    results = []
    for model in filter(None, args.models.split(",")):
        for mode in modes:
            r = launch(args, model, mode, args.steps, args.warmup)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    for mode in modes:  # the largest shape each mode trains
        for model in filter(None, args.largest.split(",")):
            r = {**launch(args, model, mode, 1, 1), "largest_search": True}
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if not r.get("fits", False):
                break
    info = {
        "benchmark": "fsdp_memory",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "model", "mode", "result")
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2))
    print(f"wrote {args.out}")
    print(table(results))


if __name__ == "__main__":
    main()
