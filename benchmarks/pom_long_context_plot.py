"""Val loss against training time at long sequence lengths: attention vs PoM vs the hybrid.

    python benchmarks/pom_long_context_plot.py --results DIR --out docs/pom_long_context.png

Reads DIR/{attention,pom,hybrid}_T<T>.json (benchmarks/speedrun.py, with ``val_loss_curve``),
draws one panel per T (val loss against training seconds, compilation excluded), and prints a
table: each run's final val loss and time, and the time at which it first reaches the target
loss of that T, the worst final loss among the runs (so that every run reaches it); the table
also goes to the --out path with a .md suffix.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def time_to_loss(curve: list, target: float) -> float | None:
    """Training seconds at which the val loss first reaches ``target`` (linear between evals)."""
    prev = None
    for _, secs, loss in curve:
        if secs is None:
            continue
        if loss <= target:
            if prev is None or prev[1] == loss:
                return secs
            s0, l0 = prev
            return s0 + (secs - s0) * (l0 - target) / (l0 - loss)
        prev = (secs, loss)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    runs: dict[int, dict[str, dict]] = {}
    for f in sorted(args.results.glob("*_T*.json")):
        m = re.fullmatch(r"(\w+?)_T(\d+)", f.stem)
        if m:
            runs.setdefault(int(m.group(2)), {})[m.group(1)] = json.loads(f.read_text())
    if not runs:
        raise SystemExit(f"no <model>_T<T>.json results in {args.results}")
    lines = [
        "| T | model | final val loss | train s | target loss | s to target |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for T, by_model in sorted(runs.items()):
        # the curves' own last points: the JSON rounds them, so the unrounded final val_loss of
        # the worst run could lie just below its curve and that run would never reach it
        target = max(r["val_loss_curve"][-1][2] for r in by_model.values())
        for name, r in sorted(by_model.items()):
            t = time_to_loss(r["val_loss_curve"], target)
            lines.append(
                f"| {T:,} | {name} | {r['val_loss']:.3f} | {r['train_seconds']:.0f} | "
                f"{target:.3f} | {'-' if t is None else f'{t:.0f}'} |"
            )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for by_model in runs.values() for name in by_model})
    color = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per model in every panel
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, (T, by_model) in zip(axes[0], sorted(runs.items())):
        for name, r in sorted(by_model.items()):
            pts = [(s, v) for step, s, v in r["val_loss_curve"] if s is not None and step > 0]
            xs, ys = [s for s, _ in pts], [v for _, v in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=name, color=color[name])
        ax.set_title(f"T = {T:,}")
        ax.set_xlabel("training seconds (compilation excluded)")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    first = next(iter(next(iter(runs.values())).values()))
    where = f"{first.get('device', '?')}, torch {first.get('torch', '?')}"
    fig.suptitle(f"d12, 131,072 tokens per step, {where}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
