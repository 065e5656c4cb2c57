"""`muongpt plot RUN_DIR... [--out PNG] [--table MD] [--log-scale]`: compare runs at a glance.

Reads each run's ``metrics.jsonl`` (a run still in progress is fine: a half-written last line is
skipped), its ``config.yaml`` (experiment name, max_steps), Hydra's ``.hydra/overrides.yaml`` and,
once the run is done, its ``summary.json`` (the unigram entropy of its training tokens). A
multirun sweep folder (``runs/multirun/<stamp>``) stands for all its sub-runs; a folder that is
not a run (no metrics yet, e.g. a run that failed at start-up) is skipped with a warning.

Output: one PNG with loss against step, tokens and training time, and a Markdown table of final
figures, printed and optionally written to a file. The evaluations ``muongpt eval`` recorded in a
run's ``evals.jsonl`` (e.g. ``eval/hellaswag``) join the table, their latest value per run;
``--metric KEY`` plots instead any one key of metrics.jsonl or evals.jsonl against step. Train loss is drawn smoothed (an exponential
moving average, ``--smooth``) over the raw per-batch losses in faint colour; val loss is markers;
the unigram entropy (the loss of a model that ignores context) is a dashed grey line. Runs differ
in colour, line style and marker, so identical runs stay visible on top of each other. Legends
show each run's experiment and the overrides that tell it apart; the overrides shared by all runs
go in the title. Without ``--out`` the PNG goes into the run folder (``RUN/loss.png``), or for
several runs into the folder that holds them all (``runs/tiny/loss.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.cli import make_dirs, probe_file, report_errors, write_text

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
DEFAULT_PNG = "loss.png"
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")
X_AXES = (("step", "step"), ("tokens", "tokens"), ("elapsed_s", "training time (s)"))


@dataclass
class Run:
    path: Path
    records: list[dict]
    experiment: str
    overrides: list[str] = field(default_factory=list)
    max_steps: int | None = None
    label: str = ""
    entropy: float | None = None  # unigram entropy of the training tokens, once known
    evals: list[dict] = field(default_factory=list)  # RUN/evals.jsonl: muongpt eval's records

    def series(self, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        points = [(r[x_key], r[y_key]) for r in self.records if x_key in r and y_key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def metric_series(self, key: str) -> tuple[list[float], list[float]]:
        """``key`` against step from metrics.jsonl and evals.jsonl, in step order; an evaluation
        of a step repeated later replaces the earlier one."""
        points = {}
        for r in [*self.records, *self.evals]:
            if _number(r.get("step")) and _number(r.get(key)):
                points[r["step"]] = r[key]
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def last(self, key: str):
        return next((r[key] for r in reversed(self.records) if key in r), None)

    def smoothed_train(self, x_key: str, beta: float) -> tuple[list[float], list[float]]:
        """Train loss as an exponential moving average over the logged steps."""
        xs, ys = self.series(x_key, "train_loss")
        return xs, ema(ys, beta)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the first values are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


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
    experiment = str(config.get("experiment_name", path.name))
    from muongpt.evals.runlog import read_evals

    return Run(
        path,
        records,
        experiment,
        overrides,
        max_steps,
        entropy=_entropy(path),
        evals=read_evals(path),
    )


def _entropy(path: Path) -> float | None:
    try:
        value = json.loads((path / SUMMARY).read_text()).get("unigram_entropy")
    except (OSError, ValueError, AttributeError):  # no summary yet, or not one we wrote
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _is_run(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / ".hydra" / "overrides.yaml").is_file()


def _has_metrics(path: Path) -> bool:
    return (path / METRICS).is_file() and (path / METRICS).stat().st_size > 0


def _job_order(sweep: Path, run: Path) -> tuple:
    # Sub-run folders start with Hydra's job number: "0_optimizer=adamw", "1_...", "10_..."
    head = run.relative_to(sweep).parts[0].split("_", 1)[0]
    return (int(head) if head.isdigit() else math.inf, str(run))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories named by ``paths``; a sweep folder expands to its sub-runs, in job order."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise MuonGPTError(f"{p}: not a directory")
        if not p.is_dir():
            if p.name != DEFAULT_PNG:  # runs/tiny/* meets the plot of runs/tiny: no news
                print(f"warning: {p}: a file, not a run folder; skipped", file=sys.stderr)
            continue
        if _is_run(p):
            if _has_metrics(p):
                runs.append(p)
            else:  # a run that failed at start-up, or has not logged yet
                print(f"warning: {p}: no metrics yet (not a run yet); skipped", file=sys.stderr)
            continue
        # A sweep folder: its sub-runs may sit deeper than one level (an override value with a
        # "/" in Hydra's sub-folder name makes nested folders).
        subs = sorted(
            {d.parent for d in p.rglob(METRICS)}
            | {d.parent.parent for d in p.rglob("overrides.yaml")}
        )
        subs = [d for d in subs if _is_run(d) and d != p]
        if not subs:
            print(f"warning: {p}: no {METRICS} here or in sub-folders; skipped", file=sys.stderr)
            continue
        started = [d for d in subs if _has_metrics(d)]
        for d in subs:
            if d not in started:
                print(f"note: {d}: no metrics yet, left out", file=sys.stderr)
        if not started:
            print(f"warning: {p}: none of its {len(subs)} runs has metrics yet", file=sys.stderr)
        runs += sorted(started, key=lambda d: _job_order(p, d))
    if not runs:
        raise MuonGPTError(f"no run with metrics in {', '.join(map(str, paths))}")
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


def _y_limits(runs: list[Run], beta: float) -> tuple[float, float] | None:
    """Every val point (step 0 included) and the smoothed train loss after the first 5% of each
    run's steps (the loss at init would flatten the rest); raw batches may leave the frame."""
    values = []
    for r in runs:
        last_step = r.records[-1]["step"]
        values += [v for v in r.series("step", "val_loss")[1] if math.isfinite(v)]
        for step, v in zip(*r.smoothed_train("step", beta)):
            if math.isfinite(v) and step >= 0.05 * last_step:
                values.append(v)
        if r.entropy is not None:
            values.append(r.entropy)
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.1
    return lo - pad, hi + pad


def log_axis(ax) -> None:
    """A logarithmic loss axis labelled in plain numbers (4, 5, 6 ... not 4 x 10^0)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_minor_locator(LogLocator(subs="all"))
    for formatter, setter in ((ScalarFormatter(), ax.yaxis.set_major_formatter),):
        formatter.set_scientific(False)
        setter(formatter)
    ax.yaxis.set_minor_formatter("")


def run_style(i: int) -> dict:
    """Line style and marker of the i-th run (the colour cycles apart from them)."""
    return {"ls": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)]}


def plot_runs(runs: list[Run], title: str = "", beta: float = 0.9, log_scale: bool = False):
    """A matplotlib Figure with three panels: loss against step, tokens and training time.

    Per run and panel the lines are, in order: raw train loss (faint), smoothed train loss,
    val loss (markers); then one dashed line per distinct unigram entropy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color, style = colors[i % len(colors)], run_style(i)
        for ax, (x_key, _) in zip(axes, X_AXES):
            ax.plot(*run.series(x_key, "train_loss"), color=color, lw=0.7, alpha=0.25)
            ax.plot(*run.smoothed_train(x_key, beta), color=color, lw=1.6, ls=style["ls"])
            ax.plot(
                *run.series(x_key, "val_loss"),
                color=color,
                ls="none",
                marker=style["marker"],
                ms=5,
                mfc="white",
                mew=1.4,
                zorder=3,
            )
    entropies = sorted({r.entropy for r in runs if r.entropy is not None})
    for ax, (_, name) in zip(axes, X_AXES):
        for h in entropies:
            ax.axhline(h, color="gray", ls="--", lw=1.0)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
        ax.margins(x=0.02)  # the step-0 val marker stays inside the frame
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].set_ylabel("loss (nats/token)")
    if log_scale:
        log_axis(axes[0])
    if limits := _y_limits(runs, beta):
        axes[0].set_ylim(*limits)
    # One legend entry per run (colour, line style, marker), then what the line kinds mean.
    labels = ["\n".join(textwrap.wrap(r.label, 90)) for r in runs]
    handles = [
        Line2D([], [], color=colors[i % len(colors)], lw=1.6, mfc="white", **run_style(i))
        for i in range(len(runs))
    ]
    labels += [f"train (EMA {beta:g}; raw faint)", "val"]
    handles += [
        Line2D([], [], color="gray", lw=1.6),
        Line2D([], [], color="gray", ls="none", marker="o", mfc="white"),
    ]
    if entropies:
        labels.append("unigram entropy (" + ", ".join(f"{h:.3f}" for h in entropies) + ")")
        handles.append(Line2D([], [], color="gray", ls="--", lw=1.0))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 180)), fontsize=9)
    legend_lines = sum(label.count("\n") + 1 for label in labels) / 2 + 1
    top = 1 - 0.03 * (title.count("\n") + len(textwrap.wrap(title, 180))) if title else 1
    fig.tight_layout(rect=(0, min(0.5, 0.03 + 0.032 * legend_lines), 1, top))
    return fig


def plot_metric(runs: list[Run], key: str, title: str = ""):
    """One panel: ``key`` against step, a line with markers per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, run in enumerate(runs):
        ax.plot(*run.metric_series(key), mfc="white", ms=5, label=run.label, **run_style(i))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.margins(x=0.03)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    fig.tight_layout()
    return fig


def metric_keys(runs: list[Run]) -> list[str]:
    """Every numeric key the runs logged (metrics.jsonl and evals.jsonl), step excepted."""
    keys = {k for r in runs for rec in [*r.records, *r.evals] for k, v in rec.items() if _number(v)}
    return sorted(keys - {"step"})


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_table(runs: list[Run], beta: float = 0.9, also: tuple[str, ...] = ()) -> str:
    """Markdown table of each run's final figures (a run in progress shows step / max_steps);
    the train loss is the smoothed one (one batch's loss swings too much to compare). Then a
    column per ``eval/`` figure in the runs' evals.jsonl and per key in ``also``: its value at
    the highest step."""
    from muongpt.evals.runlog import latest

    extra = sorted({k for r in runs for k in latest(r.evals)})
    extra += [k for k in also if k not in extra]
    head = "| run | steps | tokens | time (s) | tokens/s | train loss (EMA) | val loss | peak mem (GB) |"
    head += "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (8 + len(extra))]
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
            _fmt(smoothed[-1] if (smoothed := r.smoothed_train("step", beta)[1]) else None, ".4f"),
            _fmt(r.last("val_loss"), ".4f"),
            _fmt(mem, ".2f"),
        ]
        for key in extra:
            values = r.metric_series(key)[1]
            cells.append(_fmt(values[-1] if values else None, ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep folders")
    p.add_argument(
        "--out",
        default=None,
        help=f"PNG to write (default: RUN/{DEFAULT_PNG}, or the folder holding all the runs)",
    )
    p.add_argument("--table", default=None, metavar="MD", help="also write the table to this file")
    p.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    p.add_argument(
        "--metric",
        default=None,
        metavar="KEY",
        help="plot this key of metrics.jsonl or evals.jsonl against step (e.g. eval/hellaswag)",
    )
    p.add_argument(
        "--smooth", type=float, default=0.9, metavar="BETA", help="EMA of train loss (0: raw)"
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    return args


def default_out(paths: list[Path], name: str = DEFAULT_PNG) -> Path:
    """RUN/loss.png for one run; for several, loss.png in the deepest folder holding them all."""
    if len(paths) == 1:
        return paths[0] / name
    common = Path(os.path.commonpath([p.absolute() for p in paths]))
    return common / name


def save_figure(fig, out: Path) -> None:
    """Write the PNG; a folder or file that cannot be made is one line naming it."""
    import matplotlib.pyplot as plt

    make_dirs(out.parent, "--out")
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise MuonGPTError(
            f"--out: cannot write {out} ({e.strerror or type(e).__name__})"
        ) from None
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> str:
    if args.out:  # a name without a suffix is a PNG (as matplotlib saves it): say that name
        out = Path(args.out)
        args.out = str(probe_file(out.with_suffix(out.suffix or ".png"), "--out"))
    if args.table:
        probe_file(args.table, "--table")
    paths = find_runs(args.runs)
    runs = [load_run(p) for p in paths]
    common = label_runs(runs)
    title = ("shared overrides: " + ", ".join(common)) if common else ""
    if args.metric is not None:
        known = metric_keys(runs)
        if args.metric not in known:
            raise MuonGPTError(
                f"--metric {args.metric}: no run logged it (known: {', '.join(known)})"
            )
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in args.metric) + ".png"
        out = Path(args.out) if args.out else default_out(paths, name)
        fig = plot_metric(runs, args.metric, title)
    else:
        out = Path(args.out) if args.out else default_out(paths)
        fig = plot_runs(runs, title=title, beta=args.smooth, log_scale=args.log_scale)
    save_figure(fig, out)
    table = summary_table(runs, args.smooth, (args.metric,) if args.metric else ())
    if args.table:
        write_text(args.table, table + "\n", "--table")
    print(table)
    print(f"plot: {out}", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
