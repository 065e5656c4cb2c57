"""HellaSwag: pick the ending of a sentence that a language model finds most likely.

Each example is a context and four endings, one right. Each ending is scored by the sum of the
log-probabilities of its tokens given the context (the sequence fed to the model is
``[end-of-text] + tokens(ctx) + tokens(" " + ending)``: every training document starts with the
end-of-text token). Two accuracies, as lm-evaluation-harness defines them:

    accuracy_raw  argmax over endings of  sum log p(ending tokens | context)          (acc)
    accuracy      argmax over endings of  sum log p(...) / characters of the ending    (acc_norm)

``accuracy_token_norm`` (the sum divided by the ending's token count, as nanoGPT-style scripts
report) is given too. A sequence longer than the model's window keeps its last ``window + 1``
tokens (the context is cut from the left; the ending is kept whole whenever it fits).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from muongpt import MuonGPTError

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@dataclass
class Example:
    ctx: str
    endings: list[str]
    label: int


@dataclass
class Scores:
    """Per-ending scores of one example: summed log-probs, and their length normalizations."""

    logprob: list[float]
    chars: list[int]
    tokens: list[int]
    label: int

    def pick(self, norm: str = "none") -> int:
        per = {"none": [1] * len(self.logprob), "chars": self.chars, "tokens": self.tokens}[norm]
        values = [lp / max(n, 1) for lp, n in zip(self.logprob, per)]
        return max(range(len(values)), key=values.__getitem__)


def parse_example(line: str, where: str) -> Example:
    """One jsonl line (``ctx``, ``endings``, ``label``); anything else is an error naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise MuonGPTError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise MuonGPTError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if not isinstance(ctx, str):
        raise MuonGPTError(f"{where}: 'ctx' must be a string")
    if not (
        isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)
    ):
        raise MuonGPTError(f"{where}: 'endings' must be a list of at least 2 strings")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise MuonGPTError(f"{where}: 'label' must be an index into endings, got {label!r}")
    return Example(ctx, endings, label)


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise MuonGPTError(f"--data: file not found: {path}")
    examples, number = [], 0
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    examples.append(parse_example(line, f"{path}:{number}"))
                if limit is not None and len(examples) >= limit:
                    break
        except UnicodeDecodeError:
            raise MuonGPTError(f"{path}:{number + 1}: not UTF-8 text") from None
    if not examples:
        raise MuonGPTError(f"{path}: no examples (an empty file?)")
    return examples


def download_validation(cache: Path, log=print) -> Path:
    """The HellaSwag validation file, downloaded once to ``cache``; offline: one-line error."""
    import urllib.error
    import urllib.request

    if cache.is_file():
        return cache
    log(f"downloading the HellaSwag validation set to {cache}")
    tmp = cache.with_name(cache.name + ".part")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(VAL_URL, timeout=30) as response:
            tmp.write_bytes(response.read())
        tmp.replace(cache)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise MuonGPTError(
            f"--task hellaswag: could not download the validation set ({reason}); offline? "
            "pass --data hellaswag_val.jsonl"
        ) from None
    return cache


def tokenize(example: Example) -> tuple[list[int], list[list[int]]]:
    """(context tokens with the leading end-of-text token, the tokens of each ' ' + ending)."""
    from muongpt.data.tokenizer import EOT_TOKEN, encode

    return [EOT_TOKEN] + encode(example.ctx), [encode(" " + e) for e in example.endings]


def fit_window(context: list[int], ending: list[int], window: int) -> tuple[list[int], int]:
    """(sequence, number of its last tokens to score), cut from the left to window + 1 tokens."""
    seq = context + ending
    if len(seq) <= window + 1:
        return seq, len(ending)
    seq = seq[-(window + 1) :]
    return seq, min(len(ending), window)  # the first kept token has no prediction


@torch.no_grad()
def ending_scores(
    model, rows: list[tuple[list[int], int]], autocast: bool = False
) -> tuple[list[float], list[bool]]:
    """Per row: the sum of log p(token | everything before it) over its last ``n`` tokens, and
    whether each of those tokens is the model's argmax (greedy decoding would produce them)."""
    device = model.embed.weight.device
    length = max(len(seq) for seq, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    scored = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    for i, (seq, n) in enumerate(rows):  # right padding: causal attention never reads it
        ids[i, : len(seq)] = torch.tensor(seq)
        scored[i, len(seq) - 1 - n : len(seq) - 1] = True
    ids, scored = ids.to(device), scored.to(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(ids[:, :-1]).float()
    targets = ids[:, 1:]
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    hit = (logits.argmax(-1) == targets) | ~scored
    return (logp.double() * scored).sum(-1).tolist(), hit.all(-1).tolist()


def ending_logprobs(
    model, rows: list[tuple[list[int], int]], autocast: bool = False
) -> list[float]:
    """Sum of log p(token | everything before it) over the last ``n`` tokens of each row."""
    return ending_scores(model, rows, autocast)[0]


def score(
    model,
    examples: list[Example],
    window: int,
    batch_size: int = 32,
    autocast: bool = False,
    progress: bool = True,
    warn=None,
) -> list[Scores]:
    """Scores of every ending of every example, ``batch_size`` sequences per forward pass."""
    from tqdm import tqdm

    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    rows, owners, truncated = [], [], 0
    results = []
    for k, example in enumerate(examples):
        context, endings = tokenize(example)
        truncated += any(len(context) + len(e) > window + 1 for e in endings)
        for ending in endings:
            rows.append(fit_window(context, ending, window))
            owners.append(k)
        chars = [len(e) for e in example.endings]  # lm-eval: the choice, not the space before it
        results.append(Scores([], chars, [len(e) for e in endings], example.label))
    if truncated:
        warn(
            f"{truncated} of {len(examples)} examples are longer than the model's window "
            f"({window} tokens): their contexts were cut from the left"
        )
    # Similar lengths in one batch: less padding. The order of rows is restored below.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    sums = [0.0] * len(rows)
    bar = tqdm(total=len(rows), desc="hellaswag", unit="seq", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, value in zip(chunk, ending_logprobs(model, [rows[i] for i in chunk], autocast)):
            sums[i] = value
        bar.update(len(chunk))
    bar.close()
    for i, k in enumerate(owners):
        results[k].logprob.append(sums[i])
    return results


def accuracies(scores: list[Scores]) -> dict:
    n = len(scores)
    acc = lambda norm: sum(s.pick(norm) == s.label for s in scores) / n if n else math.nan
    return {
        "accuracy": acc("chars"),
        "accuracy_raw": acc("none"),
        "accuracy_token_norm": acc("tokens"),
        "n": n,
    }
