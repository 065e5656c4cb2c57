"""Time the ReLU² MLP with fused GEMM epilogues (muongpt/kernels/relu2_mlp.py) against the plain MLP.

    python benchmarks/relu2_mlp.py [--tokens 131072] [--iters 20] [--out relu2_mlp.json]

One block's MLP at speed-run size (x: tokens x 768 bf16, fc 3072 x 768 and proj 768 x 3072 fp32
weights, bf16 autocast, as in the model), forward + backward (``torch.autograd.grad`` of x, W1, W2
for a fixed dy):

- (a) the plain MLP ``proj(relu(fc(x))^2)`` under torch.compile: what the model runs today;
- (b) the fused op, eager and compiled, with the module's default launch settings;
- (c) each Triton GEMM alone, post = relu(x W1^T)^2 and dpre = (dy W2) * 2 sqrt(post), for every
  kernel ("pointer", "tma") and every entry of ``CONFIGS``; next to them torch.mm of the same
  shape (the bare cuBLAS matmul) and the compiled mm + pointwise they replace;
- (b) again, compiled, with the fastest configs of (c) for each kernel.

Each result is checked: the kernels against the PyTorch math of the op, the fused MLP's y, dx,
dW1, dW2 against fp32 autograd (normwise and max relative errors, the plain bf16 MLP's alongside).
CUDA events, median of --iters after --warmup calls. JSON to --out; a table printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from timing import cuda_median_ms

from muongpt.kernels import relu2_mlp as R

# Hopper: bf16 wgmma, fp32 accumulators. Compiled offline for sm_90 by Triton 3.5 (shared memory
# per program, pointer / tma kernel; H100 allows 227 KB per program, 228 KB per SM):
#   128x256x64 s3: 144 / 208 KB (split2: 176 KB); s4 split2: 192 / 224 KB
#   128x128x64 s4: 128 / 160 KB; s3: 96 / 128 KB (split2: 112 KB, so 2 programs fit an SM)
#   256x128x64 s3: 144 / 208 KB; 128x128x128 s3: 192 / 224 KB
# The backward's epilogue also holds the post tile: at 128 x 256 (and 256 x 128) the pointer
# kernel then spills (255 registers + stack), the tma kernel with split2 does not (176).
# The kernel module's defaults (FWD_CONFIG, BWD_CONFIG) are the fastest of benchmarks/relu2_mlp.py on an H100 (torch 2.11, Triton 3.6), M = 131,072:
# tma 128x256x64-s3-w8 takes 0.96 ms forward / 1.22 ms backward against torch.mm's 0.86 / 0.88 ms
# alone and the compiled mm + pointwise's 1.38 / 1.66 ms; the best pointer shape 1.19 / 1.37 ms.
CONFIGS: dict[str, R.GemmConfig] = {
    "128x256x64-s3-w8": R.GemmConfig(128, 256, 64, 8, 3, 8),
    "128x256x64-s3-w8-split2": R.GemmConfig(128, 256, 64, 8, 3, 8, epi_split=2),
    "128x256x64-s4-w8-split2": R.GemmConfig(128, 256, 64, 8, 4, 8, epi_split=2),
    "128x128x64-s4-w8": R.GemmConfig(128, 128, 64, 8, 4, 8),
    "128x128x64-s3-w8": R.GemmConfig(128, 128, 64, 8, 3, 8),
    "128x128x64-s3-w8-2sm-split2": R.GemmConfig(128, 128, 64, 8, 3, 8, epi_split=2, per_sm=2),
    "128x128x64-s4-w4": R.GemmConfig(128, 128, 64, 8, 4, 4),
    "256x128x64-s3-w8": R.GemmConfig(256, 128, 64, 8, 3, 8),
    "128x128x128-s3-w8": R.GemmConfig(128, 128, 128, 8, 3, 8),
}


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Normwise relative error and max |error| / max |want|, in fp32."""
    g, w = got.float(), want.float()
    d = g - w
    return {
        "rel": (d.norm() / w.norm()).item(),
        "max_rel": (d.abs().max() / w.abs().max()).item(),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", nargs="*", default=None, help="CONFIGS names (default: all)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available() or R.triton is None:
        print("needs a CUDA GPU and Triton")
        return 1
    t_start = time.time()
    M, D, H = args.tokens, args.dim, args.hidden
    timed = lambda fn: cuda_median_ms(fn, args.warmup, args.iters)  # noqa: E731

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, D, device="cuda", generator=g).bfloat16().requires_grad_()
    w1 = (torch.randn(H, D, device="cuda", generator=g) / D**0.5).requires_grad_()
    w2 = (torch.randn(D, H, device="cuda", generator=g) / H**0.5).requires_grad_()
    dy = torch.randn(M, D, device="cuda", generator=g).bfloat16()

    def plain(x, w1, w2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return R.reference_mlp(x, w1, w2)

    def fused(x, w1, w2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return R.relu2_mlp(x, w1, w2)

    def fwd_bwd(fn):
        def step():
            y = fn(x, w1, w2)
            return (y, *torch.autograd.grad(y, (x, w1, w2), dy))

        return step

    # ------------------------------------------------ (a), (b): forward + backward
    defaults = (R.KERNEL, R.FWD_CONFIG, R.BWD_CONFIG)
    plain_c = torch.compile(plain)
    fused_c = torch.compile(fused)
    mlp_rows: dict[str, float] = {}
    log("compiling and timing the plain MLP ...")
    mlp_rows["plain, compiled"] = timed(fwd_bwd(plain_c))
    log("timing the fused MLP ...")
    mlp_rows["fused, eager (defaults)"] = timed(fwd_bwd(fused))
    mlp_rows["fused, compiled (defaults)"] = timed(fwd_bwd(fused_c))

    log("checking against fp32 autograd ...")
    xf = x.detach().float().requires_grad_()
    y = R.reference_mlp(xf, w1, w2)
    exact = (y.detach(), *torch.autograd.grad(y, (xf, w1, w2), dy.float()))
    del y
    checks = {}
    for name, fn in (("plain", plain_c), ("fused", fused)):
        out = fwd_bwd(fn)()
        checks[name] = {k: errors(o, e) for k, o, e in zip(("y", "dx", "dW1", "dW2"), out, exact)}
    del exact, xf
    torch.cuda.empty_cache()

    # ------------------------------------------------ (c): the GEMMs alone
    xb, w1b, w2b = x.detach(), w1.detach().bfloat16(), w2.detach().bfloat16()
    post_ref = R._fc_relu2_torch(xb, w1b)
    dpre_ref = R._grad_pre_torch(dy, w2b, post_ref)
    flops = 2.0 * M * H * D
    gemm_rows: dict[str, dict] = {}

    def add(name: str, fn, ref=None) -> None:
        try:
            ms = timed(fn)
            row = {"ms": ms, "tflops": flops / ms / 1e9}
            if ref is not None:
                row.update(errors(fn(), ref))
        except Exception as e:  # a config that does not fit (shared memory, registers)
            row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        gemm_rows[name] = row

    fwd_plain = torch.compile(lambda a, b: R.relu2(a @ b.t()))
    bwd_plain = torch.compile(lambda g, b, p: (g @ b) * (2 * torch.relu(p)))
    pre = torch.mm(xb, w1b.t())
    add("fwd torch.mm", lambda: torch.mm(xb, w1b.t()))
    add("fwd compiled mm + relu^2", lambda: fwd_plain(xb, w1b))
    add("bwd torch.mm", lambda: torch.mm(dy, w2b))
    add("bwd compiled mm * 2 relu(pre)", lambda: bwd_plain(dy, w2b, pre))

    names = args.configs or list(CONFIGS)
    tma_taken = R._tma_ok(xb, w1b)
    seen: dict[tuple, str] = {}
    for kernel in R.KERNELS:
        for name in names:
            cfg = CONFIGS[name]
            # the pointer kernel ignores epi_split and per_sm: time each launch shape once
            key = (kernel, *cfg[:6]) if kernel == "pointer" else (kernel, *cfg)
            for which in ("fwd", "bwd"):
                row_name = f"{which} {kernel} {name}"
                if (key, which) in seen:
                    gemm_rows[row_name] = {"same_as": seen[(key, which)]}
                    continue
                seen[(key, which)] = row_name
                log(f"timing {row_name} ...")
                if which == "fwd":
                    add(
                        row_name,
                        lambda n=name, k=kernel: R.fc_relu2_kernel(xb, w1b, CONFIGS[n], k),
                        post_ref,
                    )
                else:
                    add(
                        row_name,
                        lambda n=name, k=kernel: R.grad_pre_kernel(
                            dy, w2b, post_ref, CONFIGS[n], k
                        ),
                        dpre_ref,
                    )

    # ------------------------------------------------ (b) with the fastest configs
    best = {}
    for kernel in R.KERNELS:
        for which in ("fwd", "bwd"):
            ok = {
                n.split(" ")[2]: r["ms"]
                for n, r in gemm_rows.items()
                if n.startswith(f"{which} {kernel} ") and "ms" in r and r["rel"] < 1e-2
            }
            if ok:
                best[(kernel, which)] = min(ok, key=ok.get)
    for kernel in R.KERNELS:
        if (kernel, "fwd") in best and (kernel, "bwd") in best:
            R.KERNEL, R.FWD_CONFIG, R.BWD_CONFIG = (
                kernel,
                CONFIGS[best[(kernel, "fwd")]],
                CONFIGS[best[(kernel, "bwd")]],
            )
            label = f"fused, compiled ({kernel}: {best[(kernel, 'fwd')]} / {best[(kernel, 'bwd')]})"
            log(f"timing {label} ...")
            mlp_rows[label] = timed(fwd_bwd(fused_c))
    R.KERNEL, R.FWD_CONFIG, R.BWD_CONFIG = defaults

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": R.triton.__version__,
        "tokens": M,
        "dim": D,
        "hidden": H,
        "iters": args.iters,
        "defaults": {"kernel": defaults[0], "fwd": defaults[1], "bwd": defaults[2]},
        "tma_kernel_taken": tma_taken,
        "mlp_fwd_bwd_ms": mlp_rows,
        "errors_vs_fp32": checks,
        "gemm": gemm_rows,
        "best": {f"{k} {w}": n for (k, w), n in best.items()},
        "wall_s": time.time() - t_start,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    print(f"{result['device']} / torch {result['torch']} / triton {result['triton']}")
    print(f"MLP {M} x {D} -> {H}, fwd + bwd, median of {args.iters}:")
    for name, ms in mlp_rows.items():
        print(f"  {name:<62} {ms:8.3f} ms")
    print("errors vs fp32 autograd (normwise rel / max rel):")
    for name, errs in checks.items():
        cells = "  ".join(f"{k} {v['rel']:.1e}/{v['max_rel']:.1e}" for k, v in errs.items())
        print(f"  {name:<6} {cells}")
    print(f"GEMMs alone ({M} x {H}, K = {D}; tma kernel taken: {tma_taken}):")
    for name, r in gemm_rows.items():
        if "ms" in r:
            err = f"  rel err {r['rel']:.1e}" if "rel" in r else ""
            print(f"  {name:<44} {r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s{err}")
        else:
            print(f"  {name:<44} {r.get('same_as') and 'same as ' + r['same_as'] or r['error']}")
    print("fastest: " + ", ".join(f"{k} {w}: {n}" for (k, w), n in best.items()))
    print(f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
