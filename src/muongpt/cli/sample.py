"""`muongpt sample CHECKPOINT [PROMPT]`: stream text from a trained model.

The prompt comes from the argument, or from stdin when it is ``-`` (or absent and stdin is not a
terminal). The end-of-text token goes in front as BOS, since every training document starts with
it; ``--no-bos`` leaves it out (the prompt must then be non-empty). The prompt is echoed, then the
continuation is printed as it is generated.
"""

from __future__ import annotations

import argparse
import sys

from muongpt import MuonGPTError
from muongpt.cli import report_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muongpt sample", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint file (runs/.../checkpoints/step_NNNNNN.pt)")
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
    return p.parse_args(argv)


def read_prompt(arg: str | None) -> str:
    if arg == "-" or (arg is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    return arg or ""


def run(args: argparse.Namespace) -> None:
    from muongpt.data.tokenizer import EOT_TOKEN, encode
    from muongpt.generate import (
        TextStreamer,
        check_sampling_args,
        generate_tokens,
        load_model,
        resolve_device,
    )

    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    text = read_prompt(args.prompt)
    prompt = ([] if args.no_bos else [EOT_TOKEN]) + encode(text)
    if not prompt:
        raise MuonGPTError("empty prompt with --no-bos: give a prompt or drop --no-bos")
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    if not args.no_echo:
        sys.stdout.write(text)
        sys.stdout.flush()
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
