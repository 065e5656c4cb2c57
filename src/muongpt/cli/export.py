"""`muongpt export FORMAT ...`: hand a trained model to other tools.

muongpt export hf CHECKPOINT OUT_DIR          a Hugging Face transformers model directory
muongpt export safetensors CHECKPOINT [OUT]   the weights alone (default: model.safetensors
                                              beside the checkpoint)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muongpt.cli import probe_dir, probe_file, report_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt export", description=__doc__.splitlines()[0])
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf",
        help="a directory transformers loads with trust_remote_code=True (model=gpt only)",
        description="Write config.json, model.safetensors, modeling code, tokenizer and model "
        "card; the result is loaded back with transformers and its logits checked.",
    )
    hf.add_argument("checkpoint", help="step_NNNNNN.pt or model.safetensors")
    hf.add_argument("out_dir")
    hf.add_argument("--force", action="store_true", help="replace an earlier muongpt export")
    hf.add_argument(
        "--no-verify", action="store_true", help="skip loading the result back with transformers"
    )
    st = formats.add_parser("safetensors", help="the weights alone, config in the metadata")
    st.add_argument("checkpoint", help="step_NNNNNN.pt")
    st.add_argument("out", nargs="?", default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.format == "safetensors":
        from muongpt.train.checkpoint import export_checkpoint

        if args.out:
            probe_file(args.out, "OUT")
        print(f"weights: {export_checkpoint(args.checkpoint, args.out)}")
        return
    from muongpt.export.hf import export_hf

    probe_dir(Path(args.out_dir).absolute().parent, "OUT_DIR")
    out, gap = export_hf(args.checkpoint, args.out_dir, force=args.force, verify=not args.no_verify)
    checked = (
        f"; transformers' logits match muongpt's (max gap {gap:.1e})" if gap is not None else ""
    )
    print(f"exported to {out}{checked}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
