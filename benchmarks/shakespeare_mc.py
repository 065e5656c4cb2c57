"""A HellaSwag-format multiple-choice file from held-out tiny Shakespeare, built reproducibly.

    python benchmarks/shakespeare_mc.py --out shakespeare_mc.jsonl [--n 1000] [--seed 0]
    muongpt eval RUN --task hellaswag --data shakespeare_mc.jsonl --name shakespeare_mc

Only the validation tail of the text is used: the same split as ``experiment=tiny``
(``data.val_fraction`` of the tokens of [end-of-text] + the text, from the end), so the model has
never trained on any of it. Each example takes one line of a speech with at least 6 words:

    ctx      the 2 lines before it (the speaker's "NAME:" line among them when it is that close)
             and the first half of the line's words
    endings  the true rest of that line, and the second halves of 3 other lines of the held-out
             text, from other speeches (drawn at random), in random order
    label    the index of the true rest

``ctx + " " + endings[label]`` is the original text. The wrong endings come from the same kind of
place (second halves of verse lines), so length and style alone do not give the answer away.
Chance is 25%.
"""

from __future__ import annotations

import argparse
import json
import random
from functools import lru_cache
from pathlib import Path

from muongpt.assets import TINY_SHAKESPEARE
from muongpt.data.tokenizer import EOT_TOKEN, decode, encode

MIN_WORDS = 6
CONTEXT_LINES = 2


@lru_cache(maxsize=1)
def held_out_text(val_fraction: float = 0.1) -> str:
    """The validation tail as the trainer splits it, from its first whole speech on."""
    tokens = [EOT_TOKEN] + encode(TINY_SHAKESPEARE.read_text(encoding="utf-8"))
    text = decode(tokens[int(len(tokens) * (1.0 - val_fraction)) :])
    return text[text.index("\n\n") + 2 :]  # the first speech may start mid-line


def candidates(text: str) -> list[dict]:
    """Every speech line of 6+ words, split in halves, with its speech number and context."""
    found = []
    for speech, block in enumerate(text.split("\n\n")):
        lines = block.split("\n")
        if len(lines) < 2 or not lines[0].endswith(":"):
            continue  # not "NAME:" followed by the speech
        for i in range(1, len(lines)):
            words = lines[i].split()
            if len(words) < MIN_WORDS or lines[i] != " ".join(words):
                continue  # short, or odd spacing that " ".join would not give back
            half = len(words) // 2
            before = lines[max(0, i - CONTEXT_LINES) : i]
            ctx = "\n".join([*before, " ".join(words[:half])])
            found.append({"speech": speech, "ctx": ctx, "rest": " ".join(words[half:])})
    return found


def build(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = candidates(held_out_text())
    chosen = rng.sample(range(len(pool)), min(n, len(pool)))
    examples = []
    for k in chosen:
        right = pool[k]
        wrong: list[str] = []
        while len(wrong) < 3:
            other = pool[rng.randrange(len(pool))]
            if other["speech"] != right["speech"] and other["rest"] not in [right["rest"], *wrong]:
                wrong.append(other["rest"])
        label = rng.randrange(4)
        endings = wrong[:label] + [right["rest"]] + wrong[label:]
        examples.append({"ctx": right["ctx"], "endings": endings, "label": label})
    return examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the jsonl to write")
    p.add_argument("--n", type=int, default=1000, help="examples (at most every candidate line)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    examples = build(args.n, args.seed)
    Path(args.out).write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    print(f"{len(examples)} examples from held-out tiny Shakespeare: {args.out}")


if __name__ == "__main__":
    main()
