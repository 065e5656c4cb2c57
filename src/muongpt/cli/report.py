"""`muongpt report RUN_DIR...`: a report card (``report.md``) for each run, and a comparison.

At the end of a run the trainer writes ``summary.json`` into the run folder (final numbers,
parameters, machine, command, the sample) and calls ``write_report``. Everything here reads only
the run folder's files: ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and any
``eval*.json`` that ``muongpt eval --json RUN/eval.json`` left there and ``evals.jsonl`` (the
downstream evaluations ``muongpt eval RUN --task/--harness`` recorded), so ``muongpt report`` can
regenerate the report of any run later (a run without ``summary.json``, unfinished or older,
gets what its metrics say). Beside ``report.md`` goes ``val_loss.png``: the loss curve.

With several runs, ``muongpt report`` also prints one Markdown table that compares them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.cli import probe_file, report_errors, write_text

SUMMARY = "summary.json"
REPORT = "report.md"
CURVE = "val_loss.png"


# ---------------------------------------------------------------- facts gathered at the run's end
def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the source tree the run started from ('+dirty' with local edits), if any."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or a hung repository
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_facts(trainer, overrides: list[str], argv: list[str], started: float) -> dict:
    """What the report needs that the run folder's other files do not hold (main rank)."""
    import torch

    from muongpt.cli.bench import MFU_FORMULA, flops_per_token, peak_flops, sample_training_rows

    device = trainer.device
    seconds = trainer.train_seconds
    tok_s = trainer.tokens_seen / seconds if seconds > 0 else None
    facts = {
        "command": " ".join([Path(argv[0]).name, *argv[1:]]),
        "overrides": list(overrides),
        "git_commit": git_commit(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "world_size": trainer.ctx.world_size,
        "torch": torch.__version__,
        "params": trainer.model.num_params(),
        "params_non_embedding": trainer.model.num_params(non_embedding=True),
        "tokens_per_s": tok_s,
        "wall_seconds": round(time.time() - started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    peak = peak_flops(device)
    if peak and tok_s:  # peak FLOP/s are known for listed GPUs only
        rows = sample_training_rows(trainer)
        fpt = flops_per_token(trainer.model, trainer.cfg.training.seq_len, rows)
        facts.update(
            mfu=fpt * tok_s / (peak * trainer.ctx.world_size),
            peak_flops=peak,
            mfu_formula=MFU_FORMULA,
        )
    return facts


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """summary.json: the final numbers of a run (non-finite floats become null)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in summary.items()
    }
    return write_text(Path(run_dir) / SUMMARY, json.dumps(clean, indent=2) + "\n", SUMMARY)


# ---------------------------------------------------------------- reading a run folder
def read_summary(run_dir: Path) -> dict:
    path = run_dir / SUMMARY
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise MuonGPTError(f"{path}: not valid JSON") from None
    if not isinstance(summary, dict):
        raise MuonGPTError(f"{path}: not a JSON object")
    return summary


def read_evals(run_dir: Path) -> list[tuple[str, dict]]:
    """(file name, report) of each eval*.json in the run folder that has a 'total'."""
    evals = []
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("total"), dict):
            evals.append((path.name, data))
    return evals


def _num(value, spec: str, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        return "—"
    return format(value, spec) + unit


def facts_table(run, summary: dict) -> list[tuple[str, str]]:
    """(name, value) rows of a run's report card."""
    steps, tokens = (
        summary.get("steps", run.last("step")),
        summary.get("tokens", run.last("tokens")),
    )
    seconds = summary.get("train_seconds", run.last("elapsed_s"))
    tok_s = summary.get("tokens_per_s") or (tokens / seconds if tokens and seconds else None)
    if "mfu" in summary:
        mfu = f"{100 * summary['mfu']:.1f}% of {summary['peak_flops'] / 1e12:.0f} TFLOP/s per GPU"
    else:
        mfu = "n/a (peak FLOP/s known for the GPUs in PEAK_BF16_FLOPS only)"
    params = summary.get("params")
    params_s = "—"
    if params:
        params_s = f"{params:,} ({summary.get('params_non_embedding', 0):,} without embeddings)"
    steps_s = str(steps)
    if run.max_steps is not None and steps is not None and steps < run.max_steps:
        steps_s = f"{steps} of {run.max_steps} (not finished)"
    val = summary.get("final_val_loss", run.last("val_loss"))
    rows = [
        ("run folder", f"`{run.path}`"),
        ("experiment", run.experiment),
        ("command", f"`{summary['command']}`" if summary.get("command") else "—"),
        (
            "overrides",
            ", ".join(f"`{o}`" for o in summary.get("overrides", run.overrides)) or "none",
        ),
        ("git commit", summary.get("git_commit") or "—"),
        ("machine", summary.get("machine", "—")),
        ("device / torch", f"{summary.get('device', '—')} / {summary.get('torch', '—')}"),
        ("parameters", params_s),
        ("steps", steps_s),
        ("tokens", _num(tokens, ",")),
        (
            "training time",
            _num(seconds, ".1f", " s")
            + f" (wall {_num(summary.get('wall_seconds'), '.0f', ' s')})",
        ),
        ("tokens/s", _num(tok_s, ",.0f")),
        ("MFU", mfu),
        ("final val loss", _num(val, ".4f", " nats/token")),
        ("unigram entropy", _num(summary.get("unigram_entropy"), ".4f", " nats/token")),
    ]
    return rows


def eval_section(evals: list[tuple[str, dict]]) -> list[str]:
    if not evals:
        return []
    lines = [
        "## Evaluation",
        "",
        "| file | step | tokens | loss | bits/byte |",
        "|---|---|---|---|---|",
    ]
    for name, data in evals:
        t = data["total"]
        cells = [
            name,
            str(data.get("step", "—")),
            _num(t.get("tokens"), ","),
            _num(t.get("loss"), ".4f"),
            _num(t.get("bits_per_byte"), ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def downstream_section(records: list[dict]) -> list[str]:
    """One row per figure of each record in RUN/evals.jsonl, in step order."""
    from muongpt.evals.runlog import figures

    rows = []
    for record in sorted(records, key=lambda r: _num_or(r.get("step"), -1)):
        for key, value in figures(record).items():
            cells = [
                str(record.get("step", "—")),
                _cell(record.get("checkpoint", "—")),
                key,
                _num(value, ".4f"),
                _num(record.get("n"), ","),
                _cell(Path(str(record["data"])).name) if record.get("data") else "—",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = ["## Downstream evaluation", "", "| step | checkpoint | figure | value | n | data |"]
    return [*head, "|---|---|---|---|---|---|", *rows, ""]


def _num_or(value, default):
    return value if isinstance(value, (int, float)) else default


def curve_figure(run, entropy: float | None):
    """One panel: smoothed train loss (raw faint), val loss markers, the unigram entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from muongpt.cli.plot import log_axis

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache note is noise
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs, ys = run.series("step", "train_loss")
    ax.plot(xs, ys, color="C0", lw=0.7, alpha=0.25)
    ax.plot(*run.smoothed_train("step", 0.9), color="C0", lw=1.6, label="train (EMA 0.9)")
    ax.plot(
        *run.series("step", "val_loss"), color="C1", ls="none", marker="o", mfc="white", label="val"
    )
    if entropy is not None:
        ax.axhline(entropy, color="gray", ls="--", lw=1.0, label=f"unigram entropy {entropy:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    log_axis(ax)  # the step-0 loss stays in view without flattening the rest
    ax.margins(x=0.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(run.experiment, fontsize=9)
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/val_loss.png from the run folder's files; returns the .md."""
    from muongpt.cli.plot import load_run, save_figure

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    summary = read_summary(run_dir)
    entropy = summary.get("unigram_entropy")
    save_figure(curve_figure(run, entropy), run_dir / CURVE)
    lines = [f"# Run report: {run.experiment} ({run_dir.name})", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in facts_table(run, summary)]
    lines += ["", f"![loss curve]({CURVE})", ""]
    lines += eval_section(read_evals(run_dir))
    lines += downstream_section(run.evals)
    if summary.get("sample"):
        lines += ["## Sample", "", "```text", summary["sample"].strip("\n"), "```", ""]
    return write_text(run_dir / REPORT, "\n".join(lines), REPORT)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def compare_table(run_dirs: list[Path]) -> str:
    """One Markdown row per run: the figures that tell runs apart."""
    from muongpt.cli.plot import label_runs, load_run
    from muongpt.evals.runlog import latest

    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
    evals = sorted({k for run in runs for k in latest(run.evals)})  # a column per eval figure
    head = "| run | steps | tokens | time (s) | tokens/s | val loss | unigram entropy | params | device |"
    head += "".join(f" {k} |" for k in evals)
    lines = [head, "|" + "---|" * (9 + len(evals))]
    for run in runs:
        s = read_summary(run.path)
        rows = dict(facts_table(run, s))
        tok_s = rows["tokens/s"]
        cells = [
            run.label.replace("|", "\\|"),
            rows["steps"],
            rows["tokens"],
            _num(s.get("train_seconds", run.last("elapsed_s")), ".1f"),
            tok_s,
            _num(s.get("final_val_loss", run.last("val_loss")), ".4f"),
            _num(s.get("unigram_entropy"), ".4f"),
            _num(s.get("params"), ","),
            str(s.get("device", "—")),
        ]
        found = latest(run.evals)
        cells += [_num(found.get(k), ".4f") for k in evals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or sweep folders")
    p.add_argument("--table", default=None, metavar="MD", help="also write the comparison here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from muongpt.cli.plot import find_runs

    run_dirs = find_runs(args.runs)
    if args.table:
        probe_file(args.table, "--table")
    for d in run_dirs:
        print(f"report: {write_report(d)}", file=sys.stderr)
    if len(run_dirs) > 1 or args.table:
        table = compare_table(run_dirs)
        print(table)
        if args.table:
            write_text(args.table, table + "\n", "--table")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
