"""Where the fused PoM layer's time goes, and the kernels' launch shapes (one GPU).

    python benchmarks/pom_kernel_profile.py --out pom_kernel_profile.json

For one PoM layer (d = 768, degree 2, expansion 2 by default) at 65,536 tokens per batch, bf16:
the time of its six matmuls alone (the floor the kernels cannot go under), of the fused pointwise
kernels (forward + backward, ``pom_mix``) for each launch shape in ``--shapes``, and a
torch.profiler table of one fused forward + backward. Times are medians of CUDA-event timings.
``--row-scan`` also times the single-pass kernels (``ROW_SCAN_PROGRAMS_PER_SM``) at each shape:

    python benchmarks/pom_kernel_profile.py --T 1024 --row-scan --out rows.json

``--sums-shapes`` times the two-pass kernels with the chunk-sums kernels at their own shapes
(``SUMS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from muongpt.kernels import pom as K
from muongpt.model.gpt import MixingConfig

MIXING = MixingConfig()  # PoM's defaults


def cuda_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--degree", type=int, default=MIXING.pom_degree)
    p.add_argument("--expand", type=int, default=MIXING.pom_expand)
    p.add_argument("--heads", type=int, default=MIXING.pom_n_sel_heads, help="n_sel_heads")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument(
        "--shapes",
        default="64x64x4,64x32x4,64x32x2,64x64x8,32x64x4,32x32x4,32x32x2,128x32x4,128x64x8",
        help="CHUNK x block_c x num_warps, each run for both passes",
    )
    p.add_argument("--row-scan", action="store_true", help="time the single-pass kernels too")
    p.add_argument(
        "--sums-shapes",
        default="",
        help="block_c x num_warps of the chunk-sums kernels (kernels.pom.SUMS), each timed with "
        "the best main shapes, e.g. 32x2,64x4,128x4",
    )
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, bf16 = "cuda", torch.bfloat16
    D, S = args.dim, args.degree * args.expand * args.dim
    B, T = args.tokens // args.T, args.T
    W = S + S // args.heads
    x = torch.randn(B, T, D, device=dev, dtype=bf16)
    w_in = torch.randn(W, D, device=dev, dtype=bf16) * D**-0.5
    w_out = torch.randn(D, S, device=dev, dtype=bf16) * S**-0.5
    dy = torch.randn(B, T, D, device=dev, dtype=bf16)
    pg = F.linear(x, w_in)
    z = torch.randn(B, T, S, device=dev, dtype=bf16)
    M = B * T

    def matmuls() -> None:  # forward: [P | G] = x W_in^T, y = z W_out^T; backward: four more
        F.linear(x, w_in)
        F.linear(z, w_out)
        dz = dy.view(M, D) @ w_out
        dy.view(M, D).t() @ z.view(M, S)
        pg.view(M, W) @ w_in
        pg.view(M, W).t() @ x.view(M, D)
        del dz

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}
    result["out"] = str(args.out)
    ms = cuda_ms(matmuls)
    result["matmuls_ms"] = ms
    result["matmuls_ns_per_token"] = ms * 1e6 / M
    flops = 3 * 2 * D * (W + S) * M
    result["matmul_tflops"] = flops / ms / 1e9
    print(
        f"six matmuls: {ms:.3f} ms = {ms * 1e6 / M:.1f} ns/token ({flops / ms / 1e9:.0f} TFLOP/s)"
    )

    dz = torch.randn(B, T, S, device=dev, dtype=bf16)

    def time_mix(label: str) -> dict:
        """Forward and backward of the kernels at the module's current launch settings."""
        _, prefix = K.mix_forward_kernel(pg, args.degree, args.heads)
        fwd = cuda_ms(lambda: K.mix_forward_kernel(pg, args.degree, args.heads))
        bwd = cuda_ms(lambda: K.mix_backward_kernel(pg, prefix, dz, args.degree, args.heads))
        print(f"{label}: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms, {(fwd + bwd) * 1e6 / M:.1f} ns/token")
        return {"fwd_ms": fwd, "bwd_ms": bwd, "ns_per_token": (fwd + bwd) * 1e6 / M}

    def time_shapes(label: str) -> dict:
        timed = {}
        for shape in args.shapes.split(","):
            chunk, block_c, warps = (int(v) for v in shape.split("x"))
            cfg = K.MixConfig(block_c, warps)  # both passes, two-pass and single-pass kernels
            K.CHUNK, K.FWD, K.BWD, K.ROW_FWD, K.ROW_BWD = chunk, cfg, cfg, cfg, cfg
            timed[shape] = time_mix(f"{label} {shape} (chunk x block_c x warps)")
        return timed

    row_scan_default, row_shapes = K.ROW_SCAN_PROGRAMS_PER_SM, (K.ROW_FWD, K.ROW_BWD)
    K.ROW_SCAN_PROGRAMS_PER_SM = None  # the two-pass kernels here, the single-pass ones below
    shapes = result["mix_shapes"] = time_shapes("mix")
    if args.row_scan:  # the single-pass kernels at the same shapes
        K.ROW_SCAN_PROGRAMS_PER_SM = 0
        result["row_scan_shapes"] = time_shapes("single-pass")
    K.ROW_SCAN_PROGRAMS_PER_SM, (K.ROW_FWD, K.ROW_BWD) = row_scan_default, row_shapes
    # the best forward and backward shapes of one chunk length (the passes share the chunks)
    best = None
    for chunk in {k.split("x")[0] for k in shapes}:
        mine = {k: v for k, v in shapes.items() if k.split("x")[0] == chunk}
        f = min(mine, key=lambda k: mine[k]["fwd_ms"])
        b = min(mine, key=lambda k: mine[k]["bwd_ms"])
        total = mine[f]["fwd_ms"] + mine[b]["bwd_ms"]
        if best is None or total < best[0]:
            best = (total, f, b)
    _, f, b = best
    result["best_fwd_shape"], result["best_bwd_shape"] = f, b
    print(f"best: forward {f}, backward {b}: {best[0] * 1e6 / M:.1f} ns/token")
    fc, fb, fw = (int(v) for v in f.split("x"))
    _, bb, bw = (int(v) for v in b.split("x"))
    K.CHUNK, K.FWD, K.BWD = fc, K.MixConfig(fb, fw), K.MixConfig(bb, bw)
    best = f"{f} / {b}"
    if args.sums_shapes:  # the two-pass kernels with the chunk sums at their own shapes
        default, sums = K.SUMS, {}
        K.ROW_SCAN_PROGRAMS_PER_SM = None
        for shape in args.sums_shapes.split(","):
            block_c, warps = (int(v) for v in shape.split("x"))
            K.SUMS = K.MixConfig(block_c, warps)
            sums[shape] = time_mix(f"chunk sums {shape} (block_c x warps), main {best}")
        K.SUMS, K.ROW_SCAN_PROGRAMS_PER_SM = default, row_scan_default
        result["sums_shapes"] = sums

    xr = x.float().requires_grad_()
    wi = w_in.float().requires_grad_()
    wo = w_out.float().requires_grad_()

    def layer() -> None:
        with torch.autocast("cuda", dtype=bf16):
            y = F.linear(K.pom_mix(F.linear(xr, wi), args.degree, args.heads), wo)
        y.backward(dy)

    ms = cuda_ms(layer)
    result["fused_layer_ms"] = ms
    result["fused_layer_ns_per_token"] = ms * 1e6 / M
    print(f"fused layer (eager, best shape {best}): {ms:.3f} ms = {ms * 1e6 / M:.1f} ns/token")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer()
        torch.cuda.synchronize()
    try:
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=15)
    except (KeyError, AttributeError, ValueError):  # older spelling
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table)
    result["profile"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
