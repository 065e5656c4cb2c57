"""FlexAttention kernel options on the speed run's own attention: forward + backward time of one
layer's flex_attention call under the document/window BlockMask of a real bench-pack batch.

python benchmarks/flex_attention_sweep.py --data .devdata/bench/val_000000.bin --out sweep.json

Shapes are d12's (B = 2 rows of 65,536 tokens, 6 heads of 128 dims, bf16, softmax scale 0.12).
Each configuration is compiled on its own and timed on the long-window mask (``--window``) and
the short one (half of it); ``step ms`` weighs them as the speed-run model does (3 long-window
and 8 short-window attention layers). Every configuration's output and gradients are compared
with the default's: kernel options must not change the math beyond bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from timing import cuda_median_ms

from muongpt.data.shards import open_shard
from muongpt.model.gpt import documents
from muongpt.model.masks import document_block_mask

# (name, kernel_options); the backward's tile options carry the "bwd_" prefix
CONFIGS = [
    ("default", {}),
    ("rows_safe", {"ROWS_GUARANTEED_SAFE": True}),
    ("rows_safe+prescale", {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True}),
    ("rows_safe+tma", {"ROWS_GUARANTEED_SAFE": True, "USE_TMA": True}),
    (
        "bwd 64/64/64/64 w4 s3",
        {
            "bwd_BLOCK_M1": 64,
            "bwd_BLOCK_N1": 64,
            "bwd_BLOCK_M2": 64,
            "bwd_BLOCK_N2": 64,
            "bwd_num_warps": 4,
            "bwd_num_stages": 3,
        },
    ),
    ("bwd 64/128/128/64 w8 s2", {"bwd_num_stages": 2}),
    ("bwd 64/128/128/64 w8 s4", {"bwd_num_stages": 4}),
    (
        "bwd 32/128/128/32 w4 s3",
        {
            "bwd_BLOCK_M1": 32,
            "bwd_BLOCK_N1": 128,
            "bwd_BLOCK_M2": 128,
            "bwd_BLOCK_N2": 32,
            "bwd_num_warps": 4,
            "bwd_num_stages": 3,
        },
    ),
    ("bwd 64/128/128/64 w4 s3", {"bwd_num_warps": 4}),
    (
        "fwd 128/64 w8 s3",
        {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    ),
    (
        "fwd 128/128 w8 s2",
        {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    ),
    (
        "fwd 64/128 w4 s3",
        {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 3},
    ),
]
LONG_LAYERS, SHORT_LAYERS = 3, 8


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a bench-pack shard")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=1024, help="long-window tokens")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated config names")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 64
    B, T, H, hd = 2, 65536, 6, 128
    tokens = torch.from_numpy(open_shard(args.data)[: B * T].astype(np.int64)).view(B, T).cuda()
    docs = documents(tokens, 50256)
    masks = {
        "long": document_block_mask(docs, torch.tensor(args.window, device="cuda")),
        "short": document_block_mask(docs, torch.tensor(args.window // 2, device="cuda")),
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    dy = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=gen)
    configs = CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if c[0] in args.only.split(",")]
    reference: dict[str, list[torch.Tensor]] = {}
    rows = []
    for name, options in configs:
        compiled = torch.compile(flex_attention)
        row = {"config": name, "kernel_options": options}
        try:
            for which, mask in masks.items():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

                def fwd(mask=mask, qq=qq, kk=kk, vv=vv, f=compiled, o=options):
                    return f(qq, kk, vv, block_mask=mask, scale=0.12, kernel_options=o)

                def fwd_bwd(fwd=fwd, qq=qq, kk=kk, vv=vv):
                    qq.grad = kk.grad = vv.grad = None
                    fwd().backward(dy)

                with torch.no_grad():
                    row[f"{which} fwd ms"] = cuda_median_ms(fwd, warmup=2, iters=args.iters)
                row[f"{which} fwd+bwd ms"] = cuda_median_ms(fwd_bwd, warmup=2, iters=args.iters)
                outs = [fwd().float()]
                fwd_bwd()
                outs += [t.grad.float() for t in (qq, kk, vv)]
                if which not in reference:
                    reference[which] = outs
                row[f"{which} max rel diff"] = max(
                    float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(outs, reference[which])
                )
            row["step ms"] = (
                LONG_LAYERS * row["long fwd+bwd ms"] + SHORT_LAYERS * row["short fwd+bwd ms"]
            )
        except Exception as e:  # a config Triton cannot build (shared memory, registers)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        torch._dynamo.reset()
        print(json.dumps(row), flush=True)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [B, H, T, hd],
        "window": args.window,
        "documents": int(docs[:, -1].max()) + 1,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta}")
    print(
        f"{'config':<28}{'long f':>8}{'long f+b':>10}{'short f':>9}{'short f+b':>11}"
        f"{'step ms':>9}{'rel diff':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<28}  {r['error']}")
            continue
        diff = max(r["long max rel diff"], r["short max rel diff"])
        print(
            f"{r['config']:<28}{r['long fwd ms']:8.2f}{r['long fwd+bwd ms']:10.2f}"
            f"{r['short fwd ms']:9.2f}{r['short fwd+bwd ms']:11.2f}{r['step ms']:9.1f}"
            f"{diff:10.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
