"""Time the fp8 head + loss at speed-run size, fused (model/fp8_loss.py) against unfused.

    python benchmarks/fp8_loss_kernels.py [--tokens 65536] [--out fp8_loss.json]

Forward + backward of one micro-step's head (x: tokens x 768 bf16, W: 50304 x 768, sigmoid cap),
compiled, for: bf16 head, fp8 head (fp8 dW), fused fp8 head + loss; then the fused kernels alone
at a few launch shapes and with 2 weighted targets per position (the prefix-token loss's form),
and the e5m2 transpose. CUDA events, median of 10 after 3 warm-up calls. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from optimizer_step import time_steps  # benchmarks/ is on sys.path when run as a script

from muongpt.kernels import fp8, fp8_loss


def timed(fn) -> float:
    return statistics.median(time_steps(fn, torch.device("cuda"), warmup=3, steps=10))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    T, D, V = args.tokens, 768, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    x = F.rms_norm(torch.randn(T, D, device="cuda", generator=g), (D,)).to(torch.bfloat16)
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).requires_grad_()
    x.requires_grad_()
    t = torch.randint(0, 50257, (T,), device="cuda", generator=g)

    def cap_ce(logits):
        return F.cross_entropy(30 * torch.sigmoid(logits.float() / 7.5), t)

    heads = {
        "bf16": lambda: cap_ce(F.linear(x, w.to(torch.bfloat16))),
        "fp8 (fp8 dW)": lambda: cap_ce(fp8.fp8_linear(x, w, fp8.DEFAULT_SCALES, True)),
        "fp8 fused loss": lambda: fp8_loss.fp8_cross_entropy(
            x, w, t, fp8.DEFAULT_SCALES, "sigmoid"
        ),
    }
    rows = {}
    for name, fn in heads.items():
        compiled = torch.compile(fn)
        rows[name] = timed(lambda c=compiled: c().backward())
        torch.cuda.empty_cache()

    logits = torch.randn(T, V, device="cuda", generator=g).to(torch.bfloat16) * 4
    shapes = [(16, 256, 4), (64, 128, 8), (8, 1024, 8), (32, 128, 4)]
    blocks = [(2048, 4), (4096, 8), (1024, 4)]
    kernels = {}
    default = (fp8_loss.GRAD_TILE, fp8_loss.GRAD_WARPS, fp8_loss.LSE_BLOCK, fp8_loss.LSE_WARPS)
    for bt, bv, warps in shapes:
        fp8_loss.GRAD_TILE, fp8_loss.GRAD_WARPS = (bt, bv), warps
        kernels[f"grad tile {bt}x{bv} w{warps}"] = timed(
            lambda: fp8_loss.loss_and_grad(logits, t, 2, 30.0, 7.5, 2.0**29)
        )
    fp8_loss.GRAD_TILE, fp8_loss.GRAD_WARPS = default[0], default[1]
    for block, warps in blocks:
        fp8_loss.LSE_BLOCK, fp8_loss.LSE_WARPS = block, warps
        kernels[f"lse block {block} w{warps}"] = timed(
            lambda: fp8_loss.loss_and_grad(logits, t, 2, 30.0, 7.5, 2.0**29)
        )
    fp8_loss.LSE_BLOCK, fp8_loss.LSE_WARPS = default[2], default[3]
    # the next token and a second target (the prefix token's) in the same two passes
    t2 = torch.stack([t, t.roll(-1)], dim=1)
    weights = torch.tensor([1.0, 0.3], device="cuda")
    kernels["2 targets, default shapes"] = timed(
        lambda: fp8_loss.loss_and_grad(logits, t2, 2, 30.0, 7.5, 2.0**29, 0.0, weights)
    )
    g8 = torch.randint(0, 256, (T, V), device="cuda", dtype=torch.uint8).view(torch.float8_e5m2)
    default_tile = (fp8.TRANSPOSE_TILE, fp8.TRANSPOSE_WARPS)
    for bm, bn, warps in [(64, 128, 4), (64, 64, 4), (128, 128, 8)]:
        fp8.TRANSPOSE_TILE, fp8.TRANSPOSE_WARPS = (bm, bn), warps
        kernels[f"transpose tile {bm}x{bn} w{warps}"] = timed(lambda: fp8.transpose_fp8(g8))
    fp8.TRANSPOSE_TILE, fp8.TRANSPOSE_WARPS = default_tile
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tokens": T,
        "head_fwd_bwd_ms": rows,
        "loss_and_grad_ms": kernels,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{result['device']} / torch {result['torch']}, {T} tokens x {V} vocab")
    for name, ms in {**rows, **kernels}.items():
        print(f"{name:<28} {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
