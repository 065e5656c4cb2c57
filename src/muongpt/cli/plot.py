"""`muongpt plot RUN_DIR... [--out PNG] [--table MD]`: compare runs at a glance.

Reads each run's ``metrics.jsonl`` (a run still in progress is fine: a half-written last line is
skipped), its ``config.yaml`` (experiment name, max_steps) and Hydra's ``.hydra/overrides.yaml``.
A multirun sweep folder (``runs/multirun/<stamp>``) stands for all its sub-runs.

Output: one PNG with loss against step, tokens and training time (train loss as lines, val loss
as dashed lines with markers), and a Markdown table of final figures, printed and optionally
written to a file. Legends show each run's experiment and the overrides that tell it apart; the
overrides shared by all runs go in the title.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.cli import report_errors

METRICS = "metrics.jsonl"
X_AXES = (("step", "step"), ("tokens", "tokens"), ("elapsed_s", "training time (s)"))


@dataclass
class Run:
    path: Path
    records: list[dict]
    experiment: str
    overrides: list[str] = field(default_factory=list)
    max_steps: int | None = None
    label: str = ""

    def series(self, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        points = [(r[x_key], r[y_key]) for r in self.records if x_key in r and y_key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str):
        return next((r[key] for r in reversed(self.records) if key in r), None)


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a last line with no newline (a write in flight) is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: still being written
                continue
            raise MuonGPTError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(record, dict) or "step" not in record:
            raise MuonGPTError(f"{path}:{i}: a metrics record needs a 'step' field")
        records.append(record)
    return records


def _read_yaml(path: Path):
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # a config half-written or hand-edited: say which file
        raise MuonGPTError(f"{path}: unreadable YAML ({type(e).__name__})") from None


def load_run(path: Path) -> Run:
    metrics = path / METRICS
    if not metrics.is_file():
        raise MuonGPTError(f"{path}: no {METRICS} (not a run directory, or nothing logged yet)")
    records = read_metrics(metrics)
    if not records:
        raise MuonGPTError(f"{metrics}: no metrics yet (empty file)")
    config = _read_yaml(path / "config.yaml") or _read_yaml(path / ".hydra" / "config.yaml") or {}
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml") or []
    # hydra.* overrides (run dirs) and the experiment itself say nothing the legend lacks
    overrides = [str(o) for o in overrides if not str(o).startswith(("hydra.", "experiment="))]
    max_steps = (config.get("training") or {}).get("max_steps")
    return Run(path, records, str(config.get("experiment_name", path.name)), overrides, max_steps)


def _is_run(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / ".hydra" / "overrides.yaml").is_file()


def _job_order(sweep: Path, run: Path) -> tuple:
    # Sub-run folders start with Hydra's job number: "0_optimizer=adamw", "1_...", "10_..."
    head = run.relative_to(sweep).parts[0].split("_", 1)[0]
    return (int(head) if head.isdigit() else math.inf, str(run))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories named by ``paths``; a sweep folder expands to its sub-runs, in job order."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise MuonGPTError(f"{p}: not a directory")
        if _is_run(p):
            runs.append(p)
            continue
        # A sweep folder: its sub-runs may sit deeper than one level (an override value with a
        # "/" in Hydra's sub-folder name makes nested folders).
        subs = sorted(
            {d.parent for d in p.rglob(METRICS)}
            | {d.parent.parent for d in p.rglob("overrides.yaml")}
        )
        subs = [d for d in subs if _is_run(d) and d != p]
        if not subs:
            raise MuonGPTError(
                f"{p}: no {METRICS} here or in sub-folders (not a run or sweep folder)"
            )
        started = [d for d in subs if (d / METRICS).is_file() and (d / METRICS).stat().st_size]
        for d in subs:
            if d not in started:
                print(f"note: {d}: no metrics yet, left out", file=sys.stderr)
        if not started:
            raise MuonGPTError(f"{p}: none of its {len(subs)} runs has written metrics yet")
        runs += sorted(started, key=lambda d: _job_order(p, d))
    return runs


def label_runs(runs: list[Run]) -> list[str]:
    """Label each run: experiment + the overrides not shared by all; return the shared ones."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        own = [o for o in r.overrides if o not in common]
        r.label = r.experiment + (": " + ", ".join(own) if own else "")
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:  # identical settings: tell them apart by folder
            r.label += f" ({r.path.name})"
    return [o for o in runs[0].overrides if o in common]


def _y_limits(runs: list[Run]) -> tuple[float, float] | None:
    """Leave out the first 5% of each run's steps: the loss at init would flatten the rest."""
    values = []
    for r in runs:
        last_step = r.records[-1]["step"]
        for rec in r.records:
            for key in ("train_loss", "val_loss"):
                v = rec.get(key)
                if v is not None and math.isfinite(v) and rec["step"] >= 0.05 * last_step:
                    values.append(v)
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.1
    return lo - pad, hi + pad


def plot_runs(runs: list[Run], title: str = ""):
    """A matplotlib Figure with three panels: loss against step, tokens and training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, (x_key, _) in zip(axes, X_AXES):
            ax.plot(*run.series(x_key, "train_loss"), color=color, lw=1.4)
            ax.plot(
                *run.series(x_key, "val_loss"), color=color, lw=1.2, ls="--", marker="o", ms=3.5
            )
    for ax, (_, name) in zip(axes, X_AXES):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].set_ylabel("loss (nats/token)")
    if limits := _y_limits(runs):
        axes[0].set_ylim(*limits)
    # One legend entry per run (its colour), and two for the line styles.
    labels = ["\n".join(textwrap.wrap(r.label, 90)) for r in runs] + ["train", "val"]
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(runs))]
    handles += [
        Line2D([], [], color="gray", lw=1.4),
        Line2D([], [], color="gray", lw=1.2, ls="--", marker="o", ms=3.5),
    ]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 180)), fontsize=9)
    legend_lines = sum(label.count("\n") + 1 for label in labels) / 2 + 1
    top = 1 - 0.03 * (title.count("\n") + len(textwrap.wrap(title, 180))) if title else 1
    fig.tight_layout(rect=(0, min(0.5, 0.03 + 0.032 * legend_lines), 1, top))
    return fig


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_table(runs: list[Run]) -> str:
    """Markdown table of each run's final figures (a run in progress shows step / max_steps)."""
    head = "| run | steps | tokens | time (s) | tokens/s | train loss | val loss | peak mem (GB) |"
    lines = [head, "|" + "---|" * 8]
    for r in runs:
        step, tokens, seconds = r.last("step"), r.last("tokens"), r.last("elapsed_s")
        steps = str(step)
        if r.max_steps is not None and step < r.max_steps:
            steps = f"{step} / {r.max_steps} (running)"
        tok_s = tokens / seconds if tokens is not None and seconds else None
        mem = max((rec["peak_mem_gb"] for rec in r.records if "peak_mem_gb" in rec), default=None)
        cells = [
            r.label.replace("|", "\\|"),
            steps,
            _fmt(tokens, ","),
            _fmt(seconds, ".1f"),
            _fmt(tok_s, ",.0f"),
            _fmt(r.last("train_loss"), ".4f"),
            _fmt(r.last("val_loss"), ".4f"),
            _fmt(mem, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep folders")
    p.add_argument("--out", default="loss.png", help="PNG to write (default: loss.png)")
    p.add_argument("--table", default=None, metavar="MD", help="also write the table to this file")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    runs = [load_run(p) for p in find_runs(args.runs)]
    common = label_runs(runs)
    fig = plot_runs(runs, title=("shared overrides: " + ", ".join(common)) if common else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    table = summary_table(runs)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
    print(table)
    print(f"plot: {out}", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
