"""`muongpt eval CHECKPOINT --task hellaswag [--data FILE] [--out RESULT.json]` and
`muongpt eval CHECKPOINT --harness TASKS [--out RESULT.json]`.

``--task hellaswag``: multiple-choice accuracy (scoring in ``muongpt.evals.hellaswag``); without
``--data`` the validation file is downloaded once into ~/.cache/muongpt. ``--harness``:
lm-evaluation-harness tasks through ``muongpt.evals.harness`` (``pip install 'muongpt[harness]'``).

CHECKPOINT may be a run folder (its newest checkpoint). When the checkpoint sits in a run's
``checkpoints/`` folder the figures are also appended to ``RUN/evals.jsonl`` (see
``muongpt.evals.runlog``), where ``muongpt report`` and ``muongpt plot`` find them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.cli import probe_file, report_errors, write_text

TASKS = ("hellaswag",)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "muongpt"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="step_NNNNNN.pt, model.safetensors or a run folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help=f"one of {', '.join(TASKS)}")
    which.add_argument(
        "--harness", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated"
    )
    p.add_argument("--data", default=None, help="the task's jsonl (default: download it)")
    p.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="--harness: a folder of task YAML files of your own (e.g. on local data)",
    )
    p.add_argument("--out", default=None, metavar="RESULT.json", help="write the result as JSON")
    p.add_argument(
        "--name",
        default=None,
        help="the name the figures are recorded under (default: the task; e.g. for another "
        "multiple-choice file in HellaSwag's format)",
    )
    p.add_argument(
        "--no-record", action="store_true", help="do not append the result to RUN/evals.jsonl"
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--seq-len", type=int, default=None, help="window; default training.seq_len")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run_harness(args: argparse.Namespace) -> dict:
    """lm-evaluation-harness tasks through the ``muongpt`` model wrapper; results beside the
    checkpoint (``harness_TASKS.json``) unless ``--out`` names a file."""
    from muongpt.evals.harness import lm_eval_model

    model_class = lm_eval_model()  # one-line error when lm_eval is missing
    import lm_eval

    from muongpt.cli.sample import model_file

    tasks = [t for t in args.harness.split(",") if t]
    if not tasks:
        raise MuonGPTError("--harness: give one or more task names, comma-separated")
    checkpoint = model_file(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_name(f"harness_{'_'.join(tasks)}.json")
    probe_file(out, "--out")  # before the evaluation, which can take hours
    lm = model_class(
        checkpoint=checkpoint,
        window=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
    )
    extra = {}
    if args.include_path is not None:
        if not Path(args.include_path).is_dir():
            raise MuonGPTError(f"--include-path: not a folder: {args.include_path}")
        from lm_eval.tasks import TaskManager

        extra["task_manager"] = TaskManager(include_path=args.include_path)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, **extra)
    except (KeyError, ValueError) as e:  # unknown task names, tasks that need more
        raise MuonGPTError(f"--harness {args.harness}: {str(e).strip().splitlines()[0]}") from None
    result = {"harness": tasks, "checkpoint": str(checkpoint), **output["results"]}
    write_text(out, json.dumps(result, indent=2, default=str) + "\n", "--out")
    found = {}
    for task, metrics in output["results"].items():
        shown = {  # "acc,none" -> acc; "alias" and the stderr entries are not figures
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, float) and "stderr" not in k
        }
        found.update({f"{task}/{k}": v for k, v in shown.items()})
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"results: {out}")
    record(args, checkpoint, lm.state, found, harness=tasks, limit=args.limit)
    return result


def record(args: argparse.Namespace, checkpoint: Path, state: dict, found: dict, **about) -> None:
    """Append the figures to RUN/evals.jsonl when the checkpoint belongs to a run folder."""
    from muongpt.evals import runlog

    run_dir = runlog.run_dir_of(checkpoint)
    if args.no_record or run_dir is None or not found:
        return
    entry = runlog.eval_record(found, state, checkpoint, run_dir, **about)
    print(f"recorded in {runlog.append_eval(run_dir, entry)}")


def run(args: argparse.Namespace) -> dict:
    from muongpt.cli.sample import model_file
    from muongpt.evals import hellaswag
    from muongpt.generate import load_model, resolve_device

    if args.harness is not None:
        return run_harness(args)
    if args.task not in TASKS:
        raise MuonGPTError(f"--task {args.task}: unknown task (known: {', '.join(TASKS)})")
    for name in ("batch_size", "seq_len", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MuonGPTError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    checkpoint = model_file(args.checkpoint)  # a run folder: its newest checkpoint
    if args.out:
        probe_file(args.out, "--out")
    if args.data is None:
        data = hellaswag.download_validation(cache_dir() / "hellaswag_val.jsonl")
    else:
        data = Path(args.data)
    examples = hellaswag.read_examples(data, args.limit)
    device = resolve_device(args.device)
    model, state = load_model(checkpoint, device)
    training = state["config"].get("training") or {}
    window = args.seq_len or int(training.get("seq_len", 1024))
    autocast = device.type == "cuda" and bool(training.get("autocast_bf16", True))
    scores = hellaswag.score(
        model, examples, window, args.batch_size, autocast, progress=not args.no_progress
    )
    result = {
        "task": args.task,
        **hellaswag.accuracies(scores),
        "normalization": "accuracy: summed log-prob / characters of the ending (acc_norm)",
        "checkpoint": str(checkpoint),
        "step": state.get("step"),
        "data": str(data),
        "window": window,
    }
    name = args.name or args.task
    print(
        f"{name}: accuracy {result['accuracy']:.4f} (length-normalized), "
        f"raw {result['accuracy_raw']:.4f}, n={result['n']}"
    )
    if args.out:
        write_text(args.out, json.dumps(result, indent=2) + "\n", "--out")
    found = {name: result["accuracy"], f"{name}_raw": result["accuracy_raw"]}
    record(args, checkpoint, state, found, task=args.task, n=result["n"], data=str(data))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
