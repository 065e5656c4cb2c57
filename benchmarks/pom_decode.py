"""Decoding after a long context: PoM's constant-size state against attention's KV cache.

    python benchmarks/pom_decode.py --out pom_decode.json                  # one GPU
    python benchmarks/pom_decode.py --device cpu --small --out /tmp/d.json  # smoke test

For each model (d12 by default: attention, PoM, the hybrid ``[pom, pom, attention]``), context
length L and batch size B: the context is fed through the model's per-layer caches in pieces of
``--piece`` tokens, then ``--new`` tokens are decoded one position at a time (greedy). Reported:
decode tokens/s (B x new tokens over the decode wall time), the bytes held by the caches, and
the peak GPU memory. Weights are random (speed and memory do not depend on them), bf16, eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from muongpt.model.attention import KVCache
from muongpt.model.gpt import GPT, GPTConfig, MixingConfig
from muongpt.model.pom import PoMCache

PATTERNS = {"attention": ["attention"], "pom": ["pom"], "hybrid": ["pom", "pom", "attention"]}


def cache_bytes(caches: list) -> int:
    total = 0
    for c in caches:
        if isinstance(c, KVCache):
            total += c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()
        elif isinstance(c, PoMCache):
            total += c.sum.numel() * c.sum.element_size()
            if c.tail is not None:
                total += c.tail.numel() * c.tail.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bench(model: GPT, L: int, B: int, args, device: torch.device) -> dict:
    row = {"context": L, "batch": B}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        caches = model.new_caches(B, L + args.new, device, torch.bfloat16)
        row["cache_mib"] = cache_bytes(caches) / 2**20
        idx = torch.randint(0, model.config.vocab_size, (B, L), device=device)
        t0 = time.perf_counter()
        for s in range(0, L, args.piece):
            logits = model(idx[:, s : s + args.piece], caches=caches)
        sync(device)
        row["prefill_s"] = time.perf_counter() - t0
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(args.warmup):  # warm-up steps are real decode steps (the cache grows)
            nxt = model(nxt, caches=caches)[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.new - args.warmup):
            nxt = model(nxt, caches=caches)[:, -1:].argmax(-1)
        sync(device)
        dt = time.perf_counter() - t0
        row["decode_tokens_per_s"] = B * (args.new - args.warmup) / dt
        row["ms_per_step"] = dt * 1e3 / (args.new - args.warmup)
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny model and lengths (CPU smoke test)")
    p.add_argument("--models", default="attention,pom,hybrid")
    p.add_argument("--contexts", default="8192,65536")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new", type=int, default=40, help="decoded tokens (warm-up included)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--piece", type=int, default=2048, help="context tokens per forward")
    args = p.parse_args()
    size = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)
    if args.small:
        size = dict(n_layer=3, n_head=2, n_embd=64, vocab_size=512)
        args.contexts, args.batches, args.new, args.warmup, args.piece = (
            "256,1024",
            "1,2",
            6,
            2,
            256,
        )
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**size, mixing=MixingConfig(PATTERNS[name])))
        model = model.to(device, torch.bfloat16).eval()
        for L in (int(v) for v in args.contexts.split(",")):
            for B in (int(v) for v in args.batches.split(",")):
                rows.append({"model": name, **bench(model, L, B, args, device)})
                r = rows[-1]
                if r["status"] != "ok":
                    print(f"{name:<10}{L:>8}{B:>5}  {r['status']}")
                    continue
                peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
                print(f"{name:<10}{L:>8}{B:>5}{r['decode_tokens_per_s']:>12.0f} tok/s"
                      f"{r['ms_per_step']:>9.2f} ms/step  cache {r['cache_mib']:>10.3f} MiB"
                      f"  peak {peak} MiB  prefill {r['prefill_s']:.1f} s")  # fmt: skip
                gc.collect()
        del model
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": {**vars(args), "out": str(args.out)},
              "size": size, "results": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
