"""kill -9 trials: kill a small CPU training run at random moments, resume it, compare bit for bit.

Each trial starts the run, SIGKILLs it at one moment, reruns it with ``training.resume=auto`` in
the same run directory, and compares the result with one uninterrupted run:

- the final checkpoint (weights, optimizer state, data position, RNG states) and the
  ``model.safetensors`` export, tensor by tensor with ``torch.equal``;
- ``metrics.jsonl`` line for line (timing fields aside), every line strict JSON, each step once;
- no temporary file left behind.

Moments: at the start of a random step before the first checkpoint; inside a random checkpoint
save (the temporary file written, whole or torn, not yet renamed); inside the export; and at a
random wall-clock time. Kills inside a save or the export are made precise by a prelude that the
run executes first (the process SIGKILLs itself there); the prelude also draws from the torch,
numpy and Python RNGs every step, so a resume that did not restore them would differ.

    python benchmarks/kill_trials.py --trials 12 [--seed 0] [--workdir DIR]

prints one line per trial and ``N of N trials bit-identical``; exit code 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_STEPS = 12
CHECKPOINT_EVERY = 4
RUN = [
    "model/size=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "training.device=cpu",
    f"training.max_steps={MAX_STEPS}",
    "training.seq_len=32",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.warmup_steps=2",
    "training.cooldown_steps=4",
    "training.log_every=1",
    "training.eval_every=6",
    "training.eval_tokens=256",
    f"training.checkpoint_every={CHECKPOINT_EVERY}",
    "training.keep_checkpoints=2",
    "training.sample_tokens=4",
    "training.progress_bar=false",
]
TIMING = ("elapsed_s", "tokens_per_s")

# Run before muongpt.train's main in the same process; KILL_AT says where to die:
# "step:K" (start of step K), "save:N" / "torn:N" (inside the N-th checkpoint save, the temporary
# whole / cut in half), "export" (inside the model.safetensors write), "" (nowhere).
PRELUDE = r"""
import os, random, signal
from pathlib import Path
import numpy as np, torch
from muongpt.train import checkpoint as ckpt
from muongpt.train import trainer as tr

KIND, _, ARG = os.environ.get("KILL_AT", "").partition(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

_step = tr.Trainer.train_step
def train_step(self):
    if KIND == "step" and self.step + 1 == int(ARG):
        die()
    torch.rand(1); np.random.rand(); random.random()  # RNG streams a resume must continue
    return _step(self)
tr.Trainer.train_step = train_step

_write, _saves = ckpt.atomic_write, [0]
def atomic_write(path, write):
    path = Path(path)
    if path.name.startswith("step_"):
        _saves[0] += 1
    target = (KIND in ("save", "torn") and path.name.startswith("step_") and _saves[0] == int(ARG)
              or KIND == "export" and path.name == ckpt.EXPORT_NAME)
    if not target:
        return _write(path, write)
    def dying(tmp):
        write(tmp)
        if KIND == "torn":
            os.truncate(tmp, os.path.getsize(tmp) // 2)
        die()
    return _write(path, dying)
ckpt.atomic_write = atomic_write

from muongpt.train.__main__ import main
main()
"""


def start(run_dir: Path, kill_at: str = "", *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE, *RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": kill_at},
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def metrics(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl line, strictly parsed (a torn or non-strict line raises)."""

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def differences(run_dir: Path, reference: Path) -> list[str]:
    """What differs from the uninterrupted run (empty: bit-identical)."""
    from muongpt.train import checkpoint as ckpt

    out = []
    final = f"checkpoints/step_{MAX_STEPS:06d}.pt"
    if not (run_dir / final).is_file():
        return [f"no {final}"]
    got, want = ckpt.load_checkpoint(run_dir / final), ckpt.load_checkpoint(reference / final)
    for key in ("model", "optimizer", "loader", "tokens_seen", "rng"):
        if not same_tree(got.get(key), want.get(key)):
            out.append(f"final checkpoint: {key}")
    export = Path(ckpt.CHECKPOINT_DIR) / ckpt.EXPORT_NAME
    try:
        got_w, _ = ckpt.read_export(run_dir / export)
    except ckpt.CheckpointError as e:
        return [*out, str(e)]
    want_w, _ = ckpt.read_export(reference / export)
    if not same_tree(got_w, want_w):
        out.append("model.safetensors")
    try:
        got_m = comparable(run_dir)
    except ValueError as e:
        return [*out, f"metrics.jsonl: a line is not whole strict JSON ({e})"]
    steps = [r["step"] for r in got_m]
    if len(steps) != len(set(steps)):
        out.append("metrics.jsonl: a step appears twice")
    if got_m != comparable(reference):
        out.append("metrics.jsonl differs")
    left = [p.name for p in run_dir.rglob(".*.tmp-*")]
    if left:
        out.append(f"temporaries left: {left}")
    return out


def moments(trials: int, rng: random.Random, run_seconds: float) -> list[str]:
    """Kill moments, cycling over the kinds; random within each kind."""
    saves = MAX_STEPS // CHECKPOINT_EVERY  # the last one is the final checkpoint
    kinds = [
        lambda: f"step:{rng.randint(1, CHECKPOINT_EVERY)}",  # before the first checkpoint
        lambda: f"save:{rng.randint(1, saves)}",
        lambda: "export",
        lambda: f"time:{rng.uniform(0.3, 1.0) * run_seconds:.2f}",
        lambda: f"torn:{rng.randint(1, saves)}",
        lambda: f"time:{rng.uniform(0.3, 1.0) * run_seconds:.2f}",
    ]
    return [kinds[i % len(kinds)]() for i in range(trials)]


def trial(workdir: Path, index: int, moment: str, reference: Path) -> tuple[bool, str]:
    run_dir = workdir / f"trial_{index:02d}"
    kind, _, arg = moment.partition(":")
    delay = float(arg) if kind == "time" else 0.0
    for _attempt in range(4):  # a timed kill that came after the end is retried sooner
        proc = start(run_dir, "" if kind == "time" else moment)
        if kind == "time":
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
        code, err = finish(proc)
        if code != 0 or kind != "time":
            break
        shutil.rmtree(run_dir)
        delay /= 2
    killed = code == -9
    if code not in (0, -9):
        return False, f"the first run failed ({code}): {err.strip()[-500:]}"
    resumed = start(run_dir, "", "training.resume=auto")
    code, err = finish(resumed)
    if code != 0:
        return False, f"the resumed run failed ({code}): {err.strip()[-500:]}"
    diffs = differences(run_dir, reference)
    what = "killed" if killed else "never killed (finished first)"
    return not diffs and killed, f"{what}; " + ("bit-identical" if not diffs else "; ".join(diffs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_trials_"))
    workdir.mkdir(parents=True, exist_ok=True)
    reference = workdir / "reference"
    began = time.perf_counter()
    code, err = finish(start(reference))
    if code != 0:
        print(f"error: the reference run failed ({code}): {err.strip()[-500:]}", file=sys.stderr)
        return 2
    run_seconds = time.perf_counter() - began
    rng = random.Random(args.seed)
    passed = 0
    for i, moment in enumerate(moments(args.trials, rng, run_seconds)):
        ok, note = trial(workdir, i, moment, reference)
        passed += ok
        print(
            f"trial {i + 1:2d} kill at {moment:12s} {'ok  ' if ok else 'FAIL'} {note}", flush=True
        )
    print(f"{passed} of {args.trials} trials bit-identical (work dir {workdir})")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
