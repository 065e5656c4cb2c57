"""Loader cost per batch for d12-sized batches, with and without the prefetch thread.

For each batch shape (16 x 1024 and 1 x 65536 tokens by default) and prefetch on/off:
  back_to_back_ms  time per next() called in a tight loop (the cost of making a batch)
  blocking_ms      time the training loop spends inside next() when each step also does
                   `--step-ms` of other work (time.sleep, which like a GPU-bound step leaves the
                   CPU free); this is what prefetch must hide
  fraction         blocking_ms / step_ms: must be < 1% of a d12 step
The default step time is the d12 reference in shared/data/README.md: 275 ms per 131,072 tokens
on one H100, scaled to the batch's tokens. On CUDA the host->device copy is included (and
synchronized in the back-to-back loop).

    python benchmarks/loader_bench.py --device cuda --out loader_bench.json
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from muongpt.data.loader import TokenLoader

DEFAULT_SHARD = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "bench" / "val_000000.bin.xz"
)
D12_MS_PER_TOKEN = 275.0 / 131_072  # modded-nanogpt d12 on one H100 (shared/data/README.md)


def unpacked(shard: Path, folder: Path) -> Path:
    if shard.suffix != ".xz":
        return shard
    out = folder / shard.stem
    with lzma.open(shard) as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shard: Path, B: int, T: int, prefetch: bool, device: torch.device, args) -> dict:
    tokens = B * T
    step_ms = args.step_ms if args.step_ms is not None else tokens * D12_MS_PER_TOKEN
    loader = TokenLoader([shard], B, T, device=device, prefetch=prefetch, align_to_bos=args.align)
    for _ in range(args.warmup):
        next(loader)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(loader)
    sync(device)
    back_to_back_ms = (time.perf_counter() - t0) * 1e3 / args.steps

    blocking = []
    for _ in range(args.sim_steps):
        time.sleep(step_ms / 1e3)  # the rest of a training step, during which prefetch runs
        t = time.perf_counter()
        x, y = next(loader)
        blocking.append((time.perf_counter() - t) * 1e3)
    sync(device)
    loader.close()
    blocking.sort()
    mean = statistics.fmean(blocking)
    return {
        "batch": f"{B}x{T}",
        "B": B,
        "T": T,
        "prefetch": prefetch,
        "align_to_bos": args.align,
        "device": str(device),
        "back_to_back_ms": back_to_back_ms,
        "blocking_ms_mean": mean,
        "blocking_ms_p50": blocking[len(blocking) // 2],
        "blocking_ms_max": blocking[-1],
        "step_ms": step_ms,
        "fraction_of_step": mean / step_ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shard", type=Path, default=DEFAULT_SHARD, help=".bin or .bin.xz shard")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="16x1024,1x65536", help="comma-separated BxT")
    p.add_argument("--steps", type=int, default=200, help="back-to-back batches timed")
    p.add_argument("--sim-steps", type=int, default=50, help="simulated training steps timed")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=None, help="simulated step (default: d12)")
    p.add_argument("--align", action="store_true", help="align_to_bos=True")
    p.add_argument("--out", type=Path, default=Path("loader_bench.json"))
    args = p.parse_args()

    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = unpacked(args.shard, Path(tmp))
        for shape in args.shapes.split(","):
            B, T = (int(v) for v in shape.lower().split("x"))
            for prefetch in (True, False):
                rows.append(measure(shard, B, T, prefetch, device, args))
    args.out.write_text(json.dumps({"shard": str(args.shard), "results": rows}, indent=2))

    print(f"loader on {device} ({args.shard.name}); step = simulated d12 step; JSON: {args.out}")
    print(f"{'batch':>9} {'prefetch':>8} {'next() ms':>10} {'blocking ms':>12} {'p50 ms':>8} "
          f"{'max ms':>8} {'step ms':>8} {'of step':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['batch']:>9} {str(r['prefetch']):>8} {r['back_to_back_ms']:>10.3f} "
            f"{r['blocking_ms_mean']:>12.3f} {r['blocking_ms_p50']:>8.3f} "
            f"{r['blocking_ms_max']:>8.3f} {r['step_ms']:>8.1f} "
            f"{100 * r['fraction_of_step']:>7.3f}%"
        )


if __name__ == "__main__":
    main()
