"""The optimizer study: each optimizer's learning rate swept, then its best trained with 2 seeds.

    python benchmarks/optimizer_study.py --preset tiny --out docs/optimizer_study_tiny   # CPU
    python benchmarks/optimizer_study.py --preset d12 --out runs/study_d12 \\
        --train-files '.devdata/bench/train_*.bin' --val-files '.devdata/bench/val_*.bin'
    python benchmarks/optimizer_study.py --preset d24 --out runs/study_d24 --train-files ... \\
        --val-files ... --compare runs/study_d12/study.json        # lr transfer, Muon and AdamW
    python benchmarks/optimizer_study.py --preset l24 ...          # d12 at d24's depth, AdamW
    python benchmarks/optimizer_study.py --preset w1024 ...        # d12 at d24's width, AdamW

Every run is ``python -m muongpt.train`` with Hydra overrides (the preset's, then the
optimizer's, then the lr and seed), in ``OUT/runs/<optimizer>_lr<lr>_s<seed>``, at one fixed
token budget. Two phases:

1. sweep: each optimizer at its default lr times ``--factors`` (default 1/2, 1, 2, 4), with the
   warmup it needs (AdamW and SOAP a tenth of the run, Muon almost none); ``--parallel N`` runs
   N at a time, every optimizer's grid in one pool (only their final val loss is used). Where the best lr is at an edge of the grid,
   the grid grows by one factor-2 step on that side (at most ``--max-extend`` times).
2. finals: each optimizer at its best lr with ``--seeds`` (default 2), one run at a time so that
   the times are honest (``--final-parallel``: the tiny preset runs 3 at a time on the CPU, its
   times only indicative): final val loss, training time, ms per step, optimizer state (bytes of
   the optimizer part of the final checkpoint).

Writes ``OUT/study.json`` (every run; a rerun skips runs already in it), ``OUT/val_vs_tokens.png``
and ``OUT/val_vs_time.png`` (the best-lr curves), and ``OUT/table.md``. With ``--compare A.json``
the best and fitted lrs of both studies are printed side by side (the lr transfer across sizes:
the config lr is the d12 one, build_optimizer applies the scaling rules). Besides the best lr of the grid, the
table gives the ``fitted`` lr: the vertex of a parabola through the val losses of the best lr and
its two neighbours against log2(lr) (a grid of factor 2 places the best lr within a factor of 2;
the transfer needs finer). ``--sweep-only`` skips the finals (e.g. to add grid points to a copy of
a finished study).

Inside muongpt AdamW's matrix lr is scaled by (n_embd / 768) ** -1 (n_layer / 12) ** -0.5, the
side groups' by (n_embd / 768) ** -0.5, Muon's by its shape factor; the lrs in the table are the
config values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muongpt.optim.config import AdamWConfig, MuonConfig, SOAPConfig


@dataclass
class Optimizer:
    name: str
    label: str
    overrides: list[str]
    default_lr: float
    warmup_frac: float


OPTIMIZERS = {
    o.name: o
    for o in [
        Optimizer("muon", "Muon", ["optimizer=muon"], MuonConfig.lr, 0.02),
        Optimizer(
            "normuon", "NorMuon", ["optimizer=muon", "optimizer.normuon=true"], MuonConfig.lr, 0.02
        ),
        Optimizer(
            "soap",
            "SOAP two-sided",
            ["optimizer=soap", "optimizer.one_sided=false"],
            SOAPConfig.lr,
            0.1,
        ),
        Optimizer(
            "soap_one_sided",
            "SOAP one-sided",
            ["optimizer=soap", "optimizer.one_sided=true"],
            SOAPConfig.lr,
            0.1,
        ),
        Optimizer("adamw", "AdamW", ["optimizer=adamw"], AdamWConfig.lr, 0.1),
    ]
}


@dataclass
class Preset:
    overrides: list[str]
    optimizers: list[str]
    needs_data: bool
    finals: bool = True
    parallel: int = 1
    final_parallel: int = 1  # > 1 only where times are not the point (a shared CPU)
    notes: str = ""
    extra: list[str] = field(default_factory=list)


# Common to every run: no checkpoints but the final one, no sample, no progress bar.
QUIET = [
    "training.progress_bar=false",
    "training.checkpoint_minutes=0",
    "training.export_safetensors=false",
    "training.sample_tokens=1",
]

# The GPU presets: the bench pack, eager, 160 steps x 32 rows of 1,024 tokens (later overrides win).
BENCH_D12 = [
    "experiment=transformers_baseline",
    "data=bench",
    "training.batch_size=32",
    "training.micro_batch_size=32",
    "training.max_steps=160",
    "training.eval_every=40",
    "training.eval_tokens=524288",
    "training.log_every=10",
    "training.cooldown_frac=0.4",
    "training.compile=false",
]


def sweep_preset(model: list[str], optimizers: list[str], notes: str) -> Preset:
    """An lr-transfer preset: d12's runs on another shape (``model``: its overrides), sweeps only."""
    return Preset(
        [*BENCH_D12, *model], optimizers, needs_data=True, finals=False, parallel=2, notes=notes
    )


PRESETS = {
    # CPU, 2 cores: a 2-layer 64-wide GPT on tiny Shakespeare, 60 steps x 1,024 tokens.
    "tiny": Preset(
        [
            "experiment=tiny",
            "model.n_layer=2",
            "model.n_embd=64",
            "model.n_head=2",
            "training.max_steps=60",
            "training.eval_every=15",
            "training.eval_tokens=4096",
            "training.log_every=10",
            "training.cooldown_frac=0.3",
            "training.final_lr_frac=0.0",
        ],
        list(OPTIMIZERS),
        needs_data=False,
        parallel=3,
        final_parallel=3,
        notes="CPU: 2-layer, 64-wide GPT, tiny Shakespeare, 60 steps x 1,024 tokens",
    ),
    # One GPU: GPT-2 small (d12) on the bench pack, 160 steps x 32,768 tokens = 5.2M tokens.
    "d12": Preset(
        BENCH_D12,
        list(OPTIMIZERS),
        needs_data=True,
        parallel=2,  # at 3 on an H200, the third run crashed at its start every time (2026-12-02)
        notes="one GPU: d12 on the bench pack, 160 steps x 32,768 tokens (5.2M tokens)",
    ),
    # The lr transfer: d24 (GPT-2 medium shape), same tokens, Muon and AdamW sweeps only.
    "d24": sweep_preset(
        ["model/size=d24", "training.micro_batch_size=16"],
        ["muon", "adamw"],
        "one GPU: d24 on the bench pack, 160 steps x 32,768 tokens, sweeps only",
    ),
    # The AdamW rule checked beyond the sizes it was fitted on: d36 (GPT-2 large shape).
    "d36": sweep_preset(
        ["model/size=d36", "training.micro_batch_size=8"],
        ["adamw"],
        "one GPU: d36 on the bench pack, 160 steps x 32,768 tokens, sweeps only",
    ),
    # Width and depth apart: d12 at d24's depth (24 layers) and at d24's width (1024), AdamW only.
    "l24": sweep_preset(
        ["model.n_layer=24", "training.micro_batch_size=16"],
        ["adamw"],
        "one GPU: d12 at 24 layers (768 wide) on the bench pack, 160 steps x 32,768 tokens",
    ),
    "w1024": sweep_preset(
        ["model.n_embd=1024", "model.n_head=16", "training.micro_batch_size=16"],
        ["adamw"],
        "one GPU: d12 at 1024 wide (12 layers) on the bench pack, 160 steps x 32,768 tokens",
    ),
}


def settled(record: dict | None) -> bool:
    """A run that needs no retry: it finished, or it diverged (a result of its lr); a crash
    (out of memory, a killed process) is run again."""
    return record is not None and ("failed" not in record or diverged(record))


def diverged(record: dict) -> bool:
    return "non-finite" in record.get("error", "")


def fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


def run_key(opt: str, lr: float, seed: int) -> str:
    return f"{opt}_lr{fmt_lr(lr)}_s{seed}"


class Study:
    def __init__(self, args):
        self.args = args
        self.preset = PRESETS[args.preset]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "study.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.data and self.data.get("preset") != args.preset:
            sys.exit(
                f"error: {self.path} holds preset {self.data.get('preset')!r}, not {args.preset!r}"
            )
        self.data.update(preset=args.preset, notes=self.preset.notes)
        self.data.setdefault("runs", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    def overrides(self, opt: Optimizer, lr: float, seed: int, run_dir: Path) -> list[str]:
        data = []
        if self.args.train_files:
            data.append(f"data.train_files={self.args.train_files}")
        if self.args.val_files:
            data.append(f"data.val_files={self.args.val_files}")
        return [
            *self.preset.overrides,
            *data,
            *QUIET,
            *opt.overrides,
            f"optimizer.lr={lr}",
            f"training.warmup_frac={opt.warmup_frac}",
            f"training.seed={seed}",
            f"hydra.run.dir={run_dir}",
            *self.args.override,
        ]

    def run(self, opt: Optimizer, lr: float, seed: int, threads: int | None) -> dict:
        """One training run; returns its record (``record_all`` skips those already settled)."""
        key = run_key(opt.name, lr, seed)
        run_dir = self.out / "runs" / key
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished earlier attempt
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "muongpt.train", *self.overrides(opt, lr, seed, run_dir)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        record = {"optimizer": opt.name, "lr": lr, "seed": seed, "wall_s": time.perf_counter() - t0}
        if proc.returncode != 0:
            lines = [  # Hydra's last line only says where the full trace is
                line
                for line in (proc.stderr or proc.stdout).strip().splitlines()
                if "HYDRA_FULL_ERROR" not in line
            ] or ["?"]
            record.update(failed=proc.returncode, error=lines[-1][:300], val_loss=math.inf)
            print(f"  {key}: failed ({lines[-1][:120]})", flush=True)
        else:
            record.update(self.read_run(run_dir))
            print(
                f"  {key}: val {record['val_loss']:.4f}, {record['train_seconds']:.1f} s",
                flush=True,
            )
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at d12; read above
        return record

    @staticmethod
    def read_run(run_dir: Path) -> dict:
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        curve = [
            [m["step"], m["tokens"], m["elapsed_s"], m["val_loss"]]
            for m in metrics
            if "val_loss" in m
        ]
        state_bytes = None
        ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
        if ckpts:  # the optimizer's part of the final checkpoint: the state it holds
            from muongpt.optim.distributed import tensor_bytes

            saved = torch.load(ckpts[-1], map_location="cpu", weights_only=True, mmap=True)
            state_bytes = tensor_bytes(saved["optimizer"])
        steps = summary["steps"]
        return {
            "val_loss": summary["final_val_loss"],
            "steps": steps,
            "tokens": summary["tokens"],
            "train_seconds": summary["train_seconds"],
            "step_ms": 1e3 * summary["train_seconds"] / max(steps, 1),
            "state_bytes": state_bytes,
            "curve": curve,  # [step, tokens, elapsed_s, val_loss]
        }

    def record_all(self, jobs: list[tuple[Optimizer, float, int]], parallel: int) -> None:
        todo = [
            j for j in jobs if not settled(self.data["runs"].get(run_key(j[0].name, j[1], j[2])))
        ]
        if not todo:
            return
        threads = None
        if parallel > 1 and not torch.cuda.is_available():
            threads = max(1, (os.cpu_count() or 1) // parallel)

        lock = threading.Lock()  # runs finishing together must not write study.json at once

        def one(job):
            record = self.run(*job, threads=threads)
            with lock:
                self.data["runs"][run_key(job[0].name, job[1], job[2])] = record
                self.save()  # after every run: an interrupted study loses nothing finished

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, todo))

    # ---------------------------------------------------------------- phases
    def sweep(self, opts: list[Optimizer]) -> dict[str, float]:
        """The best lr of each optimizer (its grid grown at an edge where needed). The grids of
        all optimizers run in one pool, so that ``--parallel`` keeps the device busy."""
        seed = self.args.seed
        grids = {opt.name: [opt.default_lr * f for f in self.args.factors] for opt in opts}
        active, best = {opt.name: opt for opt in opts}, {}
        for attempt in range(self.args.max_extend + 1):
            self.record_all(
                [(opt, lr, seed) for name, opt in active.items() for lr in grids[name]],
                self.args.parallel,
            )
            for name in list(active):
                lrs = grids[name]
                losses = {lr: self.data["runs"][run_key(name, lr, seed)]["val_loss"] for lr in lrs}
                best[name] = min(lrs, key=lambda lr: losses[lr])
                if attempt < self.args.max_extend and best[name] == lrs[0]:
                    grids[name] = [lrs[0] / 2, *lrs]
                elif attempt < self.args.max_extend and best[name] == lrs[-1]:
                    grids[name] = [*lrs, lrs[-1] * 2]
                else:
                    del active[name]
            if not active:
                break
        for opt in opts:
            self.data.setdefault("best_lr", {})[opt.name] = best[opt.name]
            self.data.setdefault("grid", {})[opt.name] = sorted(grids[opt.name])
        self.save()
        return best

    def finals(self, opt: Optimizer, lr: float) -> None:
        # new seeds, run one at a time; --reuse-sweep counts the sweep's run at the best lr as
        # the first seed (its loss and its curve against tokens, not its time: it ran in parallel)
        reuse = self.args.reuse_sweep
        timed = [self.args.seed + 1 + i for i in range(self.args.seeds - reuse)]
        self.record_all([(opt, lr, s) for s in timed], self.args.final_parallel)
        self.data.setdefault("final_seeds", {})[opt.name] = [self.args.seed] * reuse + timed
        self.data.setdefault("timed_seeds", {})[opt.name] = timed
        self.save()


# ---------------------------------------------------------------- outputs
def finals_of(data: dict, name: str, timed: bool = False) -> list[dict]:
    """The runs at the best lr (``timed``: only those run one at a time)."""
    lr, seeds = data["best_lr"][name], data.get("final_seeds", {}).get(name, [])
    if timed:
        seeds = data.get("timed_seeds", {}).get(name, seeds)
    return [data["runs"][run_key(name, lr, s)] for s in seeds]


def swept(data: dict, name: str) -> dict[float, float]:
    """lr -> val loss of the sweep's finite runs (seed ``data['seed']``)."""
    out = {}
    for lr in data["grid"][name]:
        r = data["runs"].get(run_key(name, lr, data["seed"]))
        if r is not None and math.isfinite(r["val_loss"]):
            out[lr] = r["val_loss"]
    return out


def fitted_lr(losses: dict[float, float]) -> float | None:
    """The vertex of the parabola through the best lr and its neighbours on either side, in
    log2(lr); None where the best lr has no neighbour on a side (the minimum is not bracketed)."""
    lrs = sorted(losses)
    i = min(range(len(lrs)), key=lambda k: losses[lrs[k]])
    if i == 0 or i == len(lrs) - 1:
        return None
    (x0, x1, x2), (y0, y1, y2) = (
        [math.log2(lr) for lr in lrs[i - 1 : i + 2]],
        [losses[lr] for lr in lrs[i - 1 : i + 2]],
    )
    # Lagrange form: y'(x) = 0 of the parabola through the three points
    d0, d1, d2 = (
        y0 / ((x0 - x1) * (x0 - x2)),
        y1 / ((x1 - x0) * (x1 - x2)),
        y2 / ((x2 - x0) * (x2 - x1)),
    )
    a = d0 + d1 + d2
    if a <= 0:
        return None
    return 2 ** ((d0 * (x1 + x2) + d1 * (x0 + x2) + d2 * (x0 + x1)) / (2 * a))


def table(data: dict) -> str:
    lines = [
        "| optimizer | lrs tried (val loss) | best lr | fitted lr | final val loss | time (s) | step ms | state GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, best in data.get("best_lr", {}).items():
        opt = OPTIMIZERS[name]
        tried = []
        for lr in data["grid"][name]:
            r = data["runs"].get(run_key(name, lr, data["seed"]))
            if r is None:
                loss = "not run"
            elif not math.isfinite(r["val_loss"]):
                loss = "diverged" if diverged(r) else "failed"
            else:
                loss = f"{r['val_loss']:.3f}"
            tried.append(f"{fmt_lr(lr)} ({loss})")
        runs = [r for r in finals_of(data, name) if math.isfinite(r["val_loss"])]
        if runs:
            losses = [r["val_loss"] for r in runs]
            mean = sum(losses) / len(losses)
            loss = f"{mean:.4f} ± {(max(losses) - min(losses)) / 2:.4f}"
            timed = [r for r in finals_of(data, name, timed=True) if math.isfinite(r["val_loss"])]
            timed = timed or runs
            secs = f"{sum(r['train_seconds'] for r in timed) / len(timed):.1f}"
            ms = f"{sum(r['step_ms'] for r in timed) / len(timed):.1f}"
            state = runs[0]["state_bytes"]
            gib = f"{state / 2**30:.3f}" if state is not None else "-"
        else:
            loss = secs = ms = gib = "-"
        fit = fitted_lr(swept(data, name))
        fit = fmt_lr(fit) if fit else "-"
        lines.append(
            f"| {opt.label} | {', '.join(tried)} | {fmt_lr(best)} | {fit} | {loss} | {secs} | {ms} | {gib} |"
        )
    n_seeds = max((len(v) for v in data.get("final_seeds", {}).values()), default=0)
    reused = any(
        len(v) != len(data.get("timed_seeds", {}).get(k, v))
        for k, v in data.get("final_seeds", {}).items()
    )
    how = (
        "the sweep's run and the others run one at a time; time and step ms of the latter"
        if reused
        else "run one at a time"
    )
    edge = [
        OPTIMIZERS[k].label
        for k, lr in data.get("best_lr", {}).items()
        if lr in (min(data["grid"][k]), max(data["grid"][k]))
    ]
    lines.append("")
    lines.append(
        f"{data['notes']}. Sweep: one run per lr (seed {data['seed']}); final val loss: mean ± "
        f"half-range of {n_seeds} seeds at the best lr ({how}); time: training seconds; state: "
        "the optimizer part of the final checkpoint (matrix optimizer + AdamW)."
        + (f" Best lr at the edge of the grid tried: {', '.join(edge)}." if edge else "")
    )
    return "\n".join(lines) + "\n"


def plots(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_index, xlabel, fname in [
        (1, "tokens", "val_vs_tokens.png"),
        (2, "training time (s)", "val_vs_time.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, name in enumerate(data.get("best_lr", {})):
            color = f"C{i}"
            for j, r in enumerate(finals_of(data, name, timed=x_index == 2)):
                pts = [c for c in r.get("curve", []) if c[0] > 0]  # step 0 is the same for all
                if not pts:
                    continue
                label = f"{OPTIMIZERS[name].label} (lr {fmt_lr(data['best_lr'][name])})"
                ax.plot(
                    [c[x_index] for c in pts],
                    [c[3] for c in pts],
                    color=color,
                    marker="o",
                    markersize=3,
                    linestyle="-" if j == 0 else "--",
                    label=label if j == 0 else None,
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"{data['notes']}\nbest lr of each optimizer, one line per seed", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def compare(data: dict, other: dict) -> str:
    a, b = other["preset"], data["preset"]
    lines = [
        f"| optimizer | best lr, {a} | best lr, {b} | fitted lr, {a} | fitted lr, {b} | fitted ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, lr in data.get("best_lr", {}).items():
        theirs = other.get("best_lr", {}).get(name)
        fits = [
            fitted_lr(swept(d, name)) if name in d.get("grid", {}) else None for d in (other, data)
        ]
        ratio = f"{fits[1] / fits[0]:.2f}" if all(fits) else "-"
        fa, fb = (fmt_lr(f) if f else "-" for f in fits)
        lines.append(
            f"| {OPTIMIZERS[name].label} | {fmt_lr(theirs) if theirs else '-'} | {fmt_lr(lr)} "
            f"| {fa} | {fb} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="folder for study.json, the plots, the runs")
    parser.add_argument("--train-files", default=None)
    parser.add_argument("--val-files", default=None)
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=None)
    parser.add_argument("--factors", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--max-extend", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337, help="of the sweep runs")
    parser.add_argument(
        "--reuse-sweep",
        action="store_true",
        help="the sweep's run at the best lr is the first seed (one final run less each)",
    )
    parser.add_argument("--parallel", type=int, default=None, help="sweep runs at a time")
    parser.add_argument("--final-parallel", type=int, default=None, help="final runs at a time")
    parser.add_argument("--compare", default=None, help="another study.json: best lrs side by side")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--sweep-only", action="store_true", help="no finals, no plots")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if preset.needs_data and not (args.train_files and args.val_files):
        parser.error(f"--preset {args.preset} needs --train-files and --val-files")
    if len(args.factors) < 4 and args.max_extend == 0:
        print("note: fewer than 4 learning rates per optimizer")
    args.parallel = args.parallel or preset.parallel
    args.final_parallel = args.final_parallel or preset.final_parallel
    study = Study(args)
    study.data["seed"] = args.seed
    names = args.optimizers or preset.optimizers
    t0 = time.perf_counter()
    print(f"sweep {', '.join(names)}", flush=True)
    study.sweep([OPTIMIZERS[name] for name in names])
    finals = preset.finals and not args.sweep_only
    if finals:
        for name in names:
            print(f"finals {name} at lr {fmt_lr(study.data['best_lr'][name])}", flush=True)
            study.finals(OPTIMIZERS[name], study.data["best_lr"][name])
    study.data["study_wall_s"] = study.data.get("study_wall_s", 0) + time.perf_counter() - t0
    study.save()
    text = table(study.data)
    if args.compare:
        text += (
            "\nBest lr against "
            + args.compare
            + ":\n\n"
            + compare(study.data, json.loads(Path(args.compare).read_text()))
        )
    (study.out / "table.md").write_text(text)
    if finals:
        plots(study.data, study.out)
    shutil.rmtree(study.out / "runs", ignore_errors=True) if args.preset == "tiny" else None
    print(text)
    print(f"wrote {study.path}, {study.out / 'table.md'}" + (", the plots" if finals else ""))


if __name__ == "__main__":
    main()
