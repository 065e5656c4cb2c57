"""lm-evaluation-harness access to a muongpt model: the three request types it asks of a model.

``Scorer`` answers them from plain strings (no lm_eval needed); ``lm_eval_model()`` wraps it in
an ``lm_eval.api.model.LM`` registered as ``muongpt`` (``pip install 'muongpt[harness]'``).

- ``loglikelihood(context, continuation)``: sum of log p(continuation tokens | context) and
  whether greedy decoding would produce them; the sequence is ``[end-of-text] + context +
  continuation``, cut from the left to the window (said once, on stderr).
- ``loglikelihood_rolling(text)``: log p of ``[end-of-text] + text`` token by token, in
  consecutive windows of ``window`` predicted tokens; the last window takes as much earlier
  context as fits (lm-evaluation-harness's rolling windows). Each token is predicted once.
- ``generate_until(context, {until, max_gen_toks})``: greedy tokens until a stop string, the
  end-of-text token or ``max_gen_toks`` (default 256); the text is cut before the stop string.
"""

from __future__ import annotations

import sys

from muongpt import MuonGPTError
from muongpt.evals.hellaswag import ending_scores

DEFAULT_MAX_GEN_TOKS = 256


class Scorer:
    def __init__(self, model, window: int, batch_size: int = 16, autocast: bool = False, warn=None):
        if window < 1 or batch_size < 1:
            raise MuonGPTError(f"window and batch size must be >= 1, got {window}, {batch_size}")
        self.model, self.window, self.batch_size, self.autocast = (
            model,
            window,
            batch_size,
            autocast,
        )
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.warned = False  # the left cut of long contexts is said once per run

    def rows_logprobs(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum log p, all greedy) of the last n tokens of each sequence, batched by length."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            sums, greedy = ending_scores(self.model, [rows[i] for i in chunk], self.autocast)
            for i, value, flag in zip(chunk, sums, greedy):
                out[i] = (value, flag)
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        from muongpt.data.tokenizer import EOT_TOKEN, encode
        from muongpt.evals.hellaswag import fit_window

        seqs = [([EOT_TOKEN] + encode(c), encode(x)) for c, x in pairs]
        long = sum(len(c) + len(x) > self.window + 1 for c, x in seqs)
        if long and not self.warned:
            self.warned = True
            self.warn(
                f"{long} of {len(seqs)} requests are longer than the model's window "
                f"({self.window} tokens): their contexts were cut from the left"
            )
        return self.rows_logprobs([fit_window(c, x, self.window) for c, x in seqs])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        from muongpt.data.tokenizer import EOT_TOKEN, encode

        rows, owners = [], []
        for k, text in enumerate(texts):
            tokens = [EOT_TOKEN] + encode(text)
            for a in range(1, len(tokens), self.window):  # targets a .. b-1
                b = min(a + self.window, len(tokens))
                rows.append((tokens[max(0, b - self.window - 1) : b], b - a))
                owners.append(k)
        totals = [0.0] * len(texts)
        for k, (value, _) in zip(owners, self.rows_logprobs(rows)):
            totals[k] += value
        return totals

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from muongpt.data.tokenizer import EOT_TOKEN, decode, encode
        from muongpt.generate import generate_tokens

        texts = []
        for context, kwargs in requests:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = [EOT_TOKEN] + encode(context)
            keep = max(1, self.window - limit)
            if len(prompt) > keep and not self.warned:
                self.warned = True
                self.warn(
                    f"a prompt plus max_gen_toks is longer than the model's window "
                    f"({self.window} tokens): prompts were cut from the left"
                )
            prompt = prompt[-keep:]
            tokens: list[int] = []
            text = ""
            for token in generate_tokens(self.model, prompt, limit, temperature=0):
                if token == EOT_TOKEN:
                    break
                tokens.append(token)
                text = decode(tokens)
                if any(s in text for s in until):
                    break
            cut = min([text.find(s) for s in until if s in text], default=len(text))
            texts.append(text[:cut])
        return texts


def lm_eval_model():
    """The ``lm_eval`` model class ``muongpt`` (registered on first call)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import MODEL_REGISTRY, register_model
    except ImportError:
        raise MuonGPTError(
            "lm-evaluation-harness is not installed: pip install 'muongpt[harness]'"
        ) from None
    if "muongpt" in MODEL_REGISTRY:
        return MODEL_REGISTRY["muongpt"]

    @register_model("muongpt")
    class MuonGPTLM(LM):
        """``lm_eval --model muongpt --model_args checkpoint=PATH[,batch_size=16,device=cpu]``."""

        def __init__(self, checkpoint=None, model=None, window=None, batch_size=16, device="auto"):
            super().__init__()
            from muongpt.generate import load_model, resolve_device

            self.state: dict = {}  # the checkpoint's step and tokens, for RUN/evals.jsonl
            if model is None:
                if checkpoint is None:
                    raise MuonGPTError("model_args: give checkpoint=PATH")
                dev = resolve_device(str(device))
                model, self.state = load_model(checkpoint, dev)
                training = self.state["config"].get("training") or {}
                window = window or training.get("seq_len", 1024)
                autocast = dev.type == "cuda"
            else:
                autocast = False
            self.scorer = Scorer(model, int(window or 1024), int(batch_size), autocast)

        def loglikelihood(self, requests):
            return self.scorer.loglikelihood([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests):
            return self.scorer.generate_until([tuple(r.args) for r in requests])

    return MuonGPTLM
