"""`muongpt COMMAND ...`: one entry point that dispatches to the sub-command modules."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": (
        "muongpt.train.__main__",
        "train a model (Hydra overrides follow; same as muongpt-train)",
    ),
    "data": ("muongpt.cli.data", "download FineWeb, tokenize a corpus into shards, inspect shards"),
    "sample": ("muongpt.cli.sample", "generate text from a run or checkpoint (-i: prompt loop)"),
    "eval": ("muongpt.cli.evaluate", "validation loss and bits per byte of a checkpoint"),
    "export": ("muongpt.cli.export", "export a checkpoint: hf (transformers), safetensors"),
    "plot": ("muongpt.cli.plot", "plot and tabulate runs"),
    "report": ("muongpt.cli.report", "write each run's report.md; compare several runs"),
    "bench": ("muongpt.cli.bench", "time training steps of an experiment (Hydra overrides follow)"),
}


def usage() -> str:
    lines = ["usage: muongpt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name in ("train", "bench"):
        # Hydra applications read sys.argv themselves.
        sys.argv = [f"muongpt {name}", *rest]
        return module.main() or 0
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
