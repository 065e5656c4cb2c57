"""Profile a few compiled training steps of an experiment: ms/step and the top CUDA kernels.

python benchmarks/profile_step.py --out prof.txt experiment=speedrun_bench [overrides...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from muongpt.cli.bench import compose_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
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
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                trainer.train_step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top)
        trainer.close()
    header = f"{' '.join(overrides)}\nwarm-up {compile_s:.1f} s, {ms:.1f} ms/step\n"
    with open(args.out, "w") as f:
        f.write(header + table + "\n")
    print(header + "\n".join(table.splitlines()[: args.top + 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
