"""Profile a few compiled training steps of an experiment: ms/step, the top CUDA kernels and
where the GPU waits.

python benchmarks/profile_step.py --out prof.txt [--trace trace.json] experiment=speedrun_bench [overrides...]

The idle report merges every kernel / memcpy / memset interval of the profiled steps: busy is
their union, idle the rest of the span. For the largest gaps it names the kernel that ended the
gap and the Python function (without stacks: the op) that launched it, and whether the launch
came after the GPU ran dry (the host was the bottleneck; then also the host op the launching
thread was in while the GPU waited) or before (the GPU waited on something else, e.g. a
dependency).
The phase table splits the GPU time per step by the Python frames around each launch (optimizer,
backward, forward) and by kernel kind (attention, matmul, Triton-fused, copies); the kernel table
gives each kernel's own GPU time per step (the op table after it nests, so a kernel launched
inside a custom op shows there only within the op's total).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from muongpt.cli.bench import compose_config

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
PROFILED_STEPS = 2


def idle_report(trace_file: Path, top: int = 12) -> tuple[str, float]:
    """The gaps between GPU events, largest first, and the GPU's busy time (ms) in the trace."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    gpu = sorted(
        (e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("dur", 0) > 0),
        key=lambda e: e["ts"],
    )
    if not gpu:
        return "no GPU events in the trace\n", 0.0
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    host_ops = [  # recorded with or without Python stacks
        e for e in events if e.get("cat") in HOST_CATEGORIES and e.get("dur", 0) > 0
    ]
    python = [e for e in host_ops if e["cat"] == "python_function"]
    busy, gaps, end = 0.0, [], gpu[0]["ts"]
    for e in gpu:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start > end:
            gaps.append((start - end, end, e))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - gpu[0]["ts"]
    lines = [
        f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), "
        f"idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps "
        f"({sum(g for g, _, _ in gaps if g > 20) / 1e3:.1f} ms in gaps > 20 us)"
    ]
    lines.append(f"{'gap us':>8} {'launch':>8}  next kernel <- launched from; [host op in the gap]")
    for gap, idle_from, e in sorted(gaps, key=lambda g: -g[0])[:top]:
        launch = launches.get(e.get("args", {}).get("correlation"))
        where, late, during = "?", float("nan"), ""
        if launch is not None:
            late = launch["ts"] - idle_from  # > 0: launched after the GPU ran dry
            around = [
                p for p in python if p["tid"] == launch["tid"] and covers(p, launch["ts"])
            ]  # the launching thread's frames only (the loader's thread runs alongside)
            around = [p for p in around if not p["name"].startswith(("torch/", "<built-in"))]
            if around:
                where = min(around, key=lambda p: p["dur"])["name"]
            else:  # no stacks: the innermost op around the launch
                ops = [o for o in host_ops if o["tid"] == launch["tid"] and covers(o, launch["ts"])]
                if ops:
                    where = min(ops, key=lambda o: o["dur"])["name"]
            if late > 0:
                during = f"  [{host_op_during(host_ops, launch['tid'], idle_from, launch['ts'])}]"
        lines.append(f"{gap:8.0f} {late:8.0f}  {e['name'][:60]}  <- {where[:70]}{during}")
    return "\n".join(lines) + "\n", busy / 1e3


def covers(op: dict, ts: float) -> bool:
    return op["ts"] <= ts <= op["ts"] + op["dur"]


def host_op_during(host_ops: list[dict], tid, start: float, stop: float) -> str:
    """What the launching thread ran while the GPU sat idle, from ``start`` (the GPU ran dry)
    to ``stop`` (the next launch): the innermost of its ops that overlap at least half of that
    window, else the op with the largest overlap; with the overlap in us."""

    def overlap(o: dict) -> float:
        return max(0.0, min(stop, o["ts"] + o["dur"]) - max(start, o["ts"]))

    mine = [o for o in host_ops if o["tid"] == tid and overlap(o) > 0]
    if not mine:
        return "no host op"
    most = [o for o in mine if overlap(o) >= 0.5 * (stop - start)]
    op = min(most, key=lambda o: o["dur"]) if most else max(mine, key=overlap)
    return f"{op['name'][:60]} {overlap(op):.0f} us"


KINDS = (  # kernel name patterns, first match wins
    ("attention", re.compile(r"flex|attention|fmha|flash", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|_mm_|triton_tem|splitk", re.I)),
    ("triton fused", re.compile(r"^triton_")),
    ("copy / fill", re.compile(r"memcpy|memset|copy|fill|Memcpy|Memset")),
)


PHASE_FRAMES = re.compile(r"muongpt/optim/|Optimizer\.step|backward", re.I)


def phase_of(launch: dict | None, frames: list[dict]) -> str:
    """optimizer / backward / forward, from the frames and ops around a kernel's launch
    (``frames``: only those whose names say optimizer or backward)."""
    if launch is None:
        return "?"
    names = [
        p["name"]
        for p in frames
        if p["tid"] == launch["tid"] and p["ts"] <= launch["ts"] <= p["ts"] + p["dur"]
    ]
    if any("muongpt/optim/" in n or "Optimizer.step" in n for n in names):
        return "optimizer"
    return "backward" if names else "forward / other"


def category_report(trace_file: Path, steps: int) -> str:
    """GPU time per step by phase (forward, backward, optimizer) and kernel kind."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    launches = {  # Triton's launches are driver calls, cuBLAS's and ATen's runtime calls
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    frames = [
        e
        for e in events
        if e.get("cat") in ("python_function", "cpu_op", "user_annotation")
        and e.get("dur", 0) > 0
        and PHASE_FRAMES.search(e["name"])
    ]
    table: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") not in GPU_CATEGORIES or e.get("dur", 0) <= 0:
            continue
        kind = next((k for k, rx in KINDS if rx.search(e["name"])), "other")
        phase = phase_of(launches.get(e.get("args", {}).get("correlation")), frames)
        table[phase, kind] = table.get((phase, kind), 0.0) + e["dur"] / 1e3 / steps
    phases = sorted(
        {p for p, _ in table}, key=lambda p: -sum(v for (q, _), v in table.items() if q == p)
    )
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = [f"{'ms/step':<16}" + "".join(f"{k:>14}" for k in kinds) + f"{'total':>10}"]
    for p in phases:
        row = [table.get((p, k), 0.0) for k in kinds]
        lines.append(f"{p:<16}" + "".join(f"{v:14.1f}" for v in row) + f"{sum(row):10.1f}")
    cols = [sum(table.get((p, k), 0.0) for p in phases) for k in kinds]
    lines.append(f"{'total':<16}" + "".join(f"{v:14.1f}" for v in cols) + f"{sum(cols):10.1f}")
    return "\n".join(lines) + "\n"


def kernel_report(trace_file: Path, steps: int, top: int) -> str:
    """The GPU's own time per step by kernel name (each kernel counted once, unlike the op table
    below, whose rows nest), largest first."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    time_of: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        if e.get("cat") in GPU_CATEGORIES and e.get("dur", 0) > 0:
            time_of[e["name"]] = time_of.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
            calls[e["name"]] = calls.get(e["name"], 0) + 1
    total = sum(time_of.values())
    lines = [f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel"]
    for name, ms in sorted(time_of.items(), key=lambda kv: -kv[1])[:top]:
        share = 100 * ms / total
        lines.append(f"{ms:8.2f} {share:5.1f}% {calls[name] / steps:10.1f}  {name[:100]}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def gc_pauses():
    """Python's cyclic garbage collections inside the block: yields a dict that holds, once the
    block ends, the collections per generation and their total and longest pause (ms). A pause
    stops the launching thread; a long one empties the GPU's queue (unprofiled idle the kernel
    trace cannot explain)."""
    report = {"collections": [0, 0, 0], "total_ms": 0.0, "max_ms": 0.0}
    started = []

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = 1e3 * (time.perf_counter() - started.pop())
            report["collections"][info["generation"]] += 1
            report["total_ms"] += ms
            report["max_ms"] = max(report["max_ms"], ms)

    gc.callbacks.append(timed)
    try:
        yield report
    finally:
        gc.callbacks.remove(timed)


def host_leads_ms(step, steps: int) -> tuple[float, list[float]]:
    """Run ``steps`` calls of ``step`` from an idle GPU: the wall ms per step (synchronised at
    the end) and the host's lead at each step's start, in ms.

    The lead of step i is t_gpu(i) - t_host(i): t_host the host clock when it began launching
    step i, t_gpu when the GPU reached an event recorded right then, placed on the host clock by
    an event recorded on the idle GPU at the start. A lead near 0 means the GPU waited for the
    host at that step's start; a lead that grows step by step means the host launches faster
    than the GPU runs (until the launch queue is full, which bounds it)."""
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    host = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    marks[0].record()  # runs at once on the idle GPU: its time is t0 on both clocks
    for i in range(steps):
        host.append(time.perf_counter())
        marks[i + 1].record()
        step()
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    leads = [marks[0].elapsed_time(marks[i + 1]) - 1e3 * (h - t0) for i, h in enumerate(host)]
    return ms, leads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", default="", help="also write the Chrome trace here")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument(
        "--no-stack",
        action="store_true",
        help="profile without Python stacks: less host cost, gaps name no launching frame",
    )
    args, overrides = ap.parse_known_args()
    from muongpt.train.trainer import Trainer

    cfg = compose_config(overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        t0 = time.perf_counter()
        for _ in range(3):
            trainer.train_step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        with gc_pauses() as collected:
            ms, leads = host_leads_ms(trainer.train_step, args.steps)
        with profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=not args.no_stack
        ) as prof:
            for _ in range(PROFILED_STEPS):
                trainer.train_step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top)
        trace = Path(args.trace or Path(run_dir) / "trace.json")
        prof.export_chrome_trace(str(trace))
        idle, busy_ms = idle_report(trace)
        idle += category_report(trace, steps=PROFILED_STEPS)
        idle += kernel_report(trace, steps=PROFILED_STEPS, top=args.top)
        trainer.close()
    busy = busy_ms / PROFILED_STEPS
    header = (
        f"{' '.join(overrides)}\nwarm-up {compile_s:.1f} s, {ms:.1f} ms/step\n"
        f"unprofiled step {ms:.1f} ms = GPU busy {busy:.1f} ms per profiled step "
        f"{ms - busy:+.1f} ms: about the idle of an unprofiled step (the profiler's own host "
        "cost opens gaps of its own)\n"
        f"garbage collections in the {args.steps} unprofiled steps (generations 0 / 1 / 2): "
        f"{' / '.join(map(str, collected['collections']))}, pauses {collected['total_ms']:.1f} "
        f"ms in all, {collected['max_ms']:.1f} ms the longest\n"
        f"host lead at each step's start (ms): {' '.join(f'{x:.1f}' for x in leads)}; the GPU "
        f"waited for the host at {sum(x < 0.1 for x in leads[1:])} of {len(leads) - 1} step starts "
        "after the first\n"
    )
    with open(args.out, "w") as f:
        f.write(header + idle + table + "\n")
    print(header + idle + "\n".join(table.splitlines()[: args.top + 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
