"""Check a device call's runs on this machine first: each RUNS entry's overrides are composed with
the experiment and its model (on the meta device: no memory), converters, optimizer and step
schedule built, as the trainer does before training, so that no device time goes to a config
that is refused at start-up. Data files are not read.

    RUNS="name1|overrides...;name2|overrides..." python benchmarks/check_runs.py
    RUNS=... python benchmarks/check_runs.py --filter   # print the RUNS string of the good ones
    python benchmarks/check_runs.py --jobs "$JOBS"      # parallel_runs.sh's list: its run jobs

One line per run (ok, with its last step's lr factor, momentum and row length; or FAIL and the
one-line error); exit 1 when any run fails (with --filter: 0, and only the good runs printed on
stdout, the report on stderr). A run of earlier code (name@ARCHIVE) is kept unchecked: this
code may refuse what that code accepts.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from omegaconf import OmegaConf

from muongpt import MuonGPTError
from muongpt.cli.bench import compose_config
from muongpt.config import model_config
from muongpt.kernels.converters import KernelsConfig, apply_converters
from muongpt.model import build_model
from muongpt.optim.combined import build_optimizer
from muongpt.train.schedule import Schedule
from muongpt.train.trainer import check_batch_config


def parse_runs(text: str, jobs: bool = False) -> list[tuple[str, str, list[str] | None]]:
    """(name, the entry as given, the overrides to check, or None with nothing to check) of
    each ';'-separated entry: speed_runs.sh's 'name|overrides', or with ``jobs``
    parallel_runs.sh's 'name|kind|args', whose kind ``run`` is a speed run (bench and test jobs
    are kept unchecked)."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, _, rest = entry.partition("|")
        kind, _, args = rest.partition("|") if jobs else ("run", "", rest)
        out.append((name.strip(), entry, args.split() if kind.strip() == "run" else None))
    return out


def check_run(overrides: list[str]) -> str:
    """Build what the trainer builds before its first step; the last step's settings, or raise."""
    cfg = compose_config(overrides)
    t = cfg.training
    check_batch_config(t, 1)
    with torch.device("meta"):
        model = build_model(model_config(cfg.model))
    apply_converters(model, KernelsConfig(**OmegaConf.to_container(cfg.kernels)))
    optimizer = build_optimizer(model, cfg.optimizer)
    schedule = Schedule.of_model(cfg, model)
    schedule.row_length_starts()
    last = schedule.at(t.max_steps - 1)
    momentum = "-" if last.momentum is None else f"{last.momentum:.4f}"
    groups = len([g for opt in optimizer.optimizers for g in opt.param_groups])
    return (
        f"{t.max_steps} steps, last step lr x{last.lr_scale:.3f}, momentum {momentum}, "
        f"rows of {last.seq_len}; {groups} parameter groups"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=os.environ.get("RUNS", ""), help="default: $RUNS")
    ap.add_argument("--jobs", default="", help="parallel_runs.sh's JOBS instead of RUNS")
    ap.add_argument("--base", default="experiment=speedrun_bench", help="overrides of every run")
    ap.add_argument("--filter", action="store_true", help="print the good entries' string")
    args = ap.parse_args()
    entries = parse_runs(args.jobs, jobs=True) if args.jobs else parse_runs(args.runs)
    if not entries:
        print("error: no runs: set RUNS='name|overrides;...', --runs or --jobs", file=sys.stderr)
        return 2
    report = sys.stderr if args.filter else sys.stdout
    kept, failed = [], 0
    for name, entry, overrides in entries:
        if overrides is None or "@" in name:
            why = "earlier code" if "@" in name else "not a speed run"
            line = f"skip {name}: {why}, not checked"
        else:
            try:
                line = f"ok   {name}: {check_run([*args.base.split(), *overrides])}"
            except (MuonGPTError, ValueError) as e:  # what the trainer would stop on
                line, failed = f"FAIL {name}: {str(e).splitlines()[0]}", failed + 1
            except Exception as e:  # a fault of this check, not of the run: keep the run
                line = f"skip {name}: not checked ({type(e).__name__}: {str(e).splitlines()[0]})"
        if not line.startswith("FAIL"):
            kept.append(entry)
        print(line, file=report)
    if args.filter:
        print(";".join(kept))
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
