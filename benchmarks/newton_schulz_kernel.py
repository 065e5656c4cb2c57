"""Time the symmetric Gram kernel (muongpt/kernels/newton_schulz.py) against cuBLAS on the d12 stacks.

    python benchmarks/newton_schulz_kernel.py [--iters 20] [--out newton_schulz_kernel.json]

The products of one Newton-Schulz step on the d12 hidden matrices in the wide orientation (48 of
768 x 768, 24 of 768 x 3072), bf16:

- gram: A = X X^T, the kernel (one triangle of tiles; "pointer" and "tma") for each launch shape
  of ``CONFIGS``, and torch.bmm (cuBLAS, the whole product);
- poly: B = b A + c A A^T, the kernel against torch.baddbmm;
- times: a X + B X, torch.baddbmm (which copies X into its output first) against the Triton
  product (``PRODUCT = "triton"``) for each launch shape of ``PRODUCT_CONFIGS``;
- ns: a whole 5-step Polar Express newton_schulz of each stack, through each kernel (default
  launch shape) with either last product, and through bmm / baddbmm.

TFLOP/s counts the full product's 2 m^2 k flops for both (so the kernel can pass the GEMM's peak).
Every kernel output is checked against the fp32 product. CUDA events, median of --iters after
--warmup calls. JSON to --out; a table printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
from timing import cuda_median_ms

from muongpt.kernels import newton_schulz as K
from muongpt.optim import newton_schulz

NS = sys.modules["muongpt.optim.newton_schulz"]  # muongpt.optim exports the function by name
STACKS = {"768x768": (48, 768, 768), "768x3072": (24, 768, 3072)}
# (BLOCK, BLOCK_K, num_stages, num_warps)
CONFIGS = [
    (128, 64, 4, 8),
    (128, 64, 3, 8),
    (128, 64, 3, 4),
    (128, 128, 3, 8),
    (128, 32, 5, 8),
    (64, 64, 4, 4),
    (64, 128, 3, 4),
]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the a X + B X kernel
PRODUCT_CONFIGS = [
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 8),
    (128, 256, 64, 3, 8),
    (128, 64, 64, 4, 4),
]


def time_ms(fn, args) -> float:
    return cuda_median_ms(fn, args.warmup, args.iters)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="results/newton_schulz_kernel.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    def add(product, stack, impl, ms, flops, err=None):
        rows.append(
            dict(product=product, stack=stack, impl=impl, ms=ms, tflops=flops / ms / 1e9, err=err)
        )

    for name, (b, m, k) in STACKS.items():
        x = torch.randn(b, m, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        a = torch.bmm(x, x.mT)
        gram_flops, poly_flops = 2 * b * m * m * k, 2 * b * m**3
        ref_gram = torch.bmm(x.float(), x.float().mT)
        ref_poly = torch.baddbmm(a.float(), a.float(), a.float().mT, beta=-2.8, alpha=0.5)
        bmm = partial(torch.bmm, x, x.mT)
        add("gram", name, "torch.bmm", time_ms(bmm, args), gram_flops)
        baddbmm = partial(torch.baddbmm, a, a, a, beta=-2.8, alpha=0.5)
        add("poly", name, "torch.baddbmm", time_ms(baddbmm, args), poly_flops)
        for kernel in K.KERNELS:
            for cfg in CONFIGS:
                label = "{} {}x{}x{} s{} w{}".format(kernel, cfg[0], cfg[0], *cfg[1:])
                gram = partial(K.symmetric_gram, x, launch=cfg, kernel=kernel)
                poly = partial(K.symmetric_gram, a, a, 0.5, -2.8, launch=cfg, kernel=kernel)
                err = rel_err(gram(), ref_gram), rel_err(poly(), ref_poly)
                if kernel in K.FAILED:  # e.g. a launch shape that does not fit (shared memory)
                    print(f"{name} {label}: {K.FAILED.pop(kernel)}")
                    continue
                add("gram", name, label, time_ms(gram, args), gram_flops, err[0])
                add("poly", name, label, time_ms(poly, args), poly_flops, err[1])
        times_flops = 2 * b * m * m * k
        ref_times = torch.baddbmm(x.float(), a.float(), x.float(), beta=2.5)
        times = partial(torch.baddbmm, x, a, x, beta=2.5)
        add("times", name, "torch.baddbmm", time_ms(times, args), times_flops)
        default_launch = K.PRODUCT_LAUNCH
        for cfg in PRODUCT_CONFIGS:
            K.PRODUCT_LAUNCH = cfg
            label = "triton {}x{}x{} s{} w{}".format(*cfg)
            times = partial(K.poly_times, a, x, 2.5, product="triton")
            err = rel_err(times(), ref_times)
            if "poly_times" in K.FAILED:
                print(f"{name} {label}: {K.FAILED.pop('poly_times')}")
                continue
            add("times", name, label, time_ms(times, args), times_flops, err)
        K.PRODUCT_LAUNCH = default_launch
        ns_flops = 5 * (gram_flops + poly_flops + 2 * b * m * m * k)
        ns = partial(newton_schulz, x, 5, "polar_express")
        for kernel in K.KERNELS:
            for product in K.PRODUCTS:
                (K.KERNEL, K.PRODUCT), default = (kernel, product), (K.KERNEL, K.PRODUCT)
                add("ns", name, f"{kernel} kernel, {product}", time_ms(ns, args), ns_flops)
                K.KERNEL, K.PRODUCT = default
        usable = NS.kernel_usable
        NS.kernel_usable = lambda t: False
        add("ns", name, "bmm", time_ms(ns, args), ns_flops)
        NS.kernel_usable = usable

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"symmetric Gram kernel, {report['device']}, torch {torch.__version__}")
    print(f"{'product':<6}{'stack':>10}  {'impl':<28}{'ms':>8}{'TFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        err = f"{r['err']:.1e}" if r["err"] is not None else "-"
        print(
            f"{r['product']:<6}{r['stack']:>10}  {r['impl']:<28}{r['ms']:>8.3f}{r['tflops']:>9.0f}"
            f"{err:>10}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
