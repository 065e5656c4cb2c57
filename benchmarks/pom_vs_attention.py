"""Forward+backward time and peak memory of one PoM layer vs one causal attention layer.

Tokens per batch are fixed (65,536 by default) while the sequence length T grows, so a
linear-time mixer should cost the same per token at every T and attention should not.

    python benchmarks/pom_vs_attention.py --out pom_vs_attention.json            # one GPU
    python benchmarks/pom_vs_attention.py --out pom_vs_attention.json --compile  # torch.compile
    python benchmarks/pom_vs_attention.py --device cpu --small --out /tmp/smoke.json
    python benchmarks/pom_vs_attention.py --compile --layers pom,pom_fused,attention --out x.json

``pom_fused`` is PoM with the Triton kernels of ``muongpt/kernels/pom.py`` (the ``fused_pom``
converter), the same parameters and math.

Both layers take fp32 inputs under bf16 autocast, as in training. The attention layer is a fair
one: a fused qkv projection, SDPA with is_causal=True (the flash backend on GPU) and an output
projection. Each measurement is the median of CUDA-event timings after warm-up steps; gradients
of the input and of every parameter are computed, and set to None between steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from muongpt.model.gpt import MixingConfig
from muongpt.model.pom import PoM

MIXING = MixingConfig()  # PoM's defaults


class CausalAttentionLayer(nn.Module):
    """qkv projection, causal scaled-dot-product attention, output projection (no bias)."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def make_layer(kind: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    if kind in ("pom", "pom_fused"):
        layer = PoM(args.dim, args.degree, args.expand, args.n_sel_heads, conv=args.conv)
        # A trained layer's output projection is not zero: keep the values flowing realistic.
        nn.init.normal_(layer.proj.weight, std=layer.state_dim**-0.5)
        if kind == "pom_fused":
            from muongpt.kernels.pom import FusedPoM

            layer = FusedPoM(layer)
    else:
        layer = CausalAttentionLayer(args.dim, args.heads)
    return layer.to(device)


class Timer:
    """Wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def bench_one(kind: str, T: int, args: argparse.Namespace, device: torch.device) -> dict:
    B = args.tokens // T
    row = {"layer": kind, "T": T, "B": B, "tokens": B * T}
    cuda = device.type == "cuda"
    layer = make_layer(kind, args, device)
    row["params"] = sum(p.numel() for p in layer.parameters())
    run = torch.compile(layer, dynamic=False) if args.compile else layer
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    try:
        x = torch.randn(B, T, args.dim, device=device, requires_grad=True)
        grad_out = torch.randn(B, T, args.dim, device=device, dtype=amp_dtype or torch.float32)

        # Flash attention only, on GPU (an error rather than a silent fallback to another kernel).
        # The backend is chosen when the forward runs (or is traced, under --compile).
        flash = kind == "attention" and cuda

        def step() -> None:
            with (
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else nullcontext(),
            ):
                y = run(x)
            y.backward(grad_out)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        timer = Timer(device)
        times = [timer(step) for _ in range(args.iters)]
        row["ms"] = statistics.median(times)
        row["ms_min"] = min(times)
        row["ns_per_token"] = row["ms"] * 1e6 / (B * T)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row["peak_mib"] = peak / 2**20
            row["peak_over_inputs_mib"] = (peak - base) / 2**20  # activations + workspace
        if args.profile and cuda:
            row["kernels"] = kernel_table(step, args.profile_steps)
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    return row


def kernel_table(step, steps: int, top: int = 14) -> list[dict]:
    """The GPU kernels of ``steps`` steps (torch.profiler): the ``top`` by time, microseconds
    per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [
        {"kernel": e.key[:90], "us": e.device_time_total / steps, "calls": e.count / steps}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r["us"])[:top]


def summarize(rows: list[dict]) -> dict:
    ok = {(r["layer"], r["T"]): r for r in rows if r["status"] == "ok"}
    seq_lens = sorted({r["T"] for r in rows})
    summary: dict = {}
    if any(r["layer"] == "pom_fused" for r in rows):
        summary["pom_fused_ns_per_token"] = {
            str(T): ok[("pom_fused", T)]["ns_per_token"] for T in seq_lens if ("pom_fused", T) in ok
        }
        summary["pom_fused_speedup_over_attention"] = {
            str(T): ok[("attention", T)]["ms"] / ok[("pom_fused", T)]["ms"]
            for T in seq_lens
            if ("attention", T) in ok and ("pom_fused", T) in ok
        }
        summary["pom_fused_speedup_over_pom"] = {
            str(T): ok[("pom", T)]["ms"] / ok[("pom_fused", T)]["ms"]
            for T in seq_lens
            if ("pom", T) in ok and ("pom_fused", T) in ok
        }
    pom = [ok[("pom", T)] for T in seq_lens if ("pom", T) in ok]
    if len(pom) >= 2:
        summary["pom_ns_per_token_longest_over_shortest"] = (
            pom[-1]["ns_per_token"] / pom[0]["ns_per_token"]
        )
        summary["pom_T_shortest_longest"] = [pom[0]["T"], pom[-1]["T"]]
    faster = [
        T
        for T in seq_lens
        if ("pom", T) in ok
        and ("attention", T) in ok
        and ok[("pom", T)]["ms"] < ok[("attention", T)]["ms"]
    ]
    summary["pom_faster_at_T"] = faster
    summary["pom_speedup_over_attention"] = {
        str(T): ok[("attention", T)]["ms"] / ok[("pom", T)]["ms"]
        for T in seq_lens
        if ("pom", T) in ok and ("attention", T) in ok
    }
    return summary


def print_table(rows: list[dict], summary: dict) -> None:
    if "pom_ns_per_token_longest_over_shortest" in summary:
        lo, hi = summary["pom_T_shortest_longest"]
        ratio = summary["pom_ns_per_token_longest_over_shortest"]
        print(f"PoM ns/token at T={hi} over T={lo}: {ratio:.2f}x")
    if any(r["layer"] == "pom" for r in rows):
        print(f"PoM faster than attention at T = {summary['pom_faster_at_T'] or 'none'}")
    for T, ratio in summary.get("pom_fused_speedup_over_attention", {}).items():
        print(f"fused PoM at T={T}: {ratio:.2f}x attention's speed")
    for T, ratio in summary.get("pom_fused_speedup_over_pom", {}).items():
        print(f"fused PoM at T={T}: {ratio:.2f}x the plain PoM's speed")
    header = f"{'layer':<10}{'T':>8}{'B':>6}{'ms fwd+bwd':>12}{'ns/token':>10}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['layer']:<10}{r['T']:>8}{r['B']:>6}{r['status']:>12}")
            continue
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        print(
            f"{r['layer']:<10}{r['T']:>8}{r['B']:>6}{r['ms']:>12.3f}"
            f"{r['ns_per_token']:>10.2f}{peak:>10}"
        )


def print_kernels(rows: list[dict]) -> None:
    for r in rows:
        if "kernels" not in r:
            continue
        print(f"{r['layer']} T={r['T']}: GPU kernels, microseconds per step")
        for k in r["kernels"]:
            print(f"  {k['us']:9.1f}  x{k['calls']:<4g} {k['kernel']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke test")
    p.add_argument("--compile", action="store_true", help="torch.compile both layers")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--degree", type=int, default=MIXING.pom_degree)
    p.add_argument("--expand", type=int, default=MIXING.pom_expand)
    p.add_argument("--n-sel-heads", type=int, default=MIXING.pom_n_sel_heads)
    p.add_argument("--conv", type=int, default=MIXING.pom_conv, help="PoM's convolution width")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch, B = tokens / T")
    p.add_argument("--seq-lens", default="1024,4096,16384,65536")
    p.add_argument("--layers", default="pom,attention")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=None, help="default 5, 10 with --compile")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="also list each run's GPU kernels")
    p.add_argument(
        "--fused-conv", action="store_true", help="pom_fused: the convolution by its Triton op"
    )
    p.add_argument("--profile-steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.small:
        args.dim, args.heads, args.tokens = 64, 2, 2048
        args.seq_lens, args.warmup, args.iters = "128,512,2048", 2, 3
    if args.warmup is None:
        args.warmup = 10 if args.compile else 5
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    args.layers = args.layers.split(",")
    for T in args.seq_lens:
        if args.tokens % T:
            p.error(f"--tokens ({args.tokens}) must be a multiple of every sequence length ({T})")
    if not set(args.layers) <= {"pom", "pom_fused", "attention"}:
        p.error(f"--layers must be from pom,pom_fused,attention, got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.fused_conv:
        from muongpt.kernels import pom as fused_pom

        fused_pom.FUSED_CONV = True
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for T in args.seq_lens:
        for kind in args.layers:
            rows.append(bench_one(kind, T, args, device))
            gc.collect()  # free this layer's tensors before the next one is measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary = summarize(rows)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pom_state_dim": args.degree * args.expand * args.dim,
        "results": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    print_kernels(rows)
    print_table(rows, summary)


if __name__ == "__main__":
    main()
