"""`muongpt sample CHECKPOINT|RUN_DIR [PROMPT] [-i]`: stream text from a trained model.

CHECKPOINT is a ``step_NNNNNN.pt`` or ``model.safetensors`` file, or a run folder (its newest
checkpoint). The prompt comes from the argument, or from stdin when it is ``-`` (or absent and
stdin is not a terminal). ``-i`` keeps the model loaded and asks for one prompt after another
(an empty line or Ctrl-D ends; Ctrl-C stops the text being written). The end-of-text token goes in front as BOS, since every training document starts with
it; ``--no-bos`` leaves it out (the prompt must then be non-empty). The prompt is echoed, then the
continuation is printed as it is generated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muongpt import MuonGPTError
from muongpt.cli import report_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt sample", description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoint",
        help="a run folder (its newest checkpoint), a step_NNNNNN.pt or a model.safetensors file",
    )
    p.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' reads stdin")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 disables")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the end-of-text token")
    p.add_argument("--stop-at-eot", action="store_true", help="stop at the end-of-text token")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation")
    p.add_argument(
        "-i", "--interactive", action="store_true", help="prompt after prompt, model kept loaded"
    )
    return p.parse_args(argv)


def model_file(path: str | Path) -> Path:
    """The file to load for ``path``: the path itself, or for a run folder (or its checkpoints/
    folder) its newest checkpoint; the weights-only export when it is as new as that."""
    from muongpt.train.checkpoint import CHECKPOINT_DIR, EXPORT_NAME, is_sharded, list_checkpoints

    path = Path(path)
    if path.is_file() or is_sharded(path):  # a .dcp folder is one (sharded) checkpoint
        return path
    if not path.is_dir():
        raise MuonGPTError(f"{path}: checkpoint not found (no such file or run folder)")
    folder = path if path.name == CHECKPOINT_DIR else path / CHECKPOINT_DIR
    newest = list_checkpoints(path)[-1:]
    export = folder / EXPORT_NAME
    if export.is_file() and (not newest or export.stat().st_mtime >= newest[0].stat().st_mtime):
        return export
    if newest:
        return newest[0]
    raise MuonGPTError(f"{path}: no checkpoint in it (no {CHECKPOINT_DIR}/step_NNNNNN.pt)")


def read_prompt(arg: str | None) -> str:
    if arg == "-" or (arg is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    return arg or ""


def stream(model, prompt: list[int], args: argparse.Namespace) -> None:
    """Print the continuation of ``prompt`` as it is generated."""
    from muongpt.data.tokenizer import EOT_TOKEN
    from muongpt.generate import TextStreamer, generate_tokens

    streamer = TextStreamer()
    for token in generate_tokens(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        if args.stop_at_eot and token == EOT_TOKEN:
            break
        piece = streamer.push(token)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(streamer.finish() + "\n")
    sys.stdout.flush()


def encode_prompt(text: str, no_bos: bool) -> list[int]:
    from muongpt.data.tokenizer import EOT_TOKEN, encode

    return ([] if no_bos else [EOT_TOKEN]) + encode(text)


def interactive(model, args: argparse.Namespace) -> None:
    """Read prompts until an empty line or end of input; each gets a streamed continuation."""
    print("type a prompt and press Enter; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # leave the terminal on a fresh line
            return
        if not text.strip():
            return
        if not args.no_echo:
            sys.stdout.write(text)
        try:
            stream(model, encode_prompt(text, args.no_bos), args)
        except KeyboardInterrupt:  # stop this continuation, keep the session
            print("\n[stopped]", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    from muongpt.generate import check_sampling_args, load_model, resolve_device

    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.interactive and args.prompt is not None:
        raise MuonGPTError("-i reads prompts interactively: give no PROMPT argument with it")
    path = model_file(args.checkpoint)
    if args.interactive:
        model, _ = load_model(path, resolve_device(args.device))
        return interactive(model, args)
    text = read_prompt(args.prompt)
    prompt = encode_prompt(text, args.no_bos)
    if not prompt:
        raise MuonGPTError("empty prompt with --no-bos: give a prompt or drop --no-bos")
    model, _ = load_model(path, resolve_device(args.device))
    if not args.no_echo:
        sys.stdout.write(text)
        sys.stdout.flush()
    stream(model, prompt, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
