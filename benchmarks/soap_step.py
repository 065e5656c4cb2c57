"""Time SOAP's step over d12's hidden matrices, for its variants, in one short process.

    python benchmarks/soap_step.py --out results/soap_step.json          # one GPU, ~30 s
    python benchmarks/soap_step.py --device cpu --small --out /tmp/s.json  # smoke test

The 72 hidden matrices of GPT d12 (12 blocks: q, k, v, proj 768x768, mlp fc 3072x768, mlp proj
768x3072), fp32, fresh random gradients before every step (not timed). ``--warmup`` steps
(the first one only builds the statistics and eigenbases), then ``--steps`` timed steps (CUDA
events): median = a plain step, mean = the step amortized over the basis refreshes (every 10
steps: with ``--steps 20`` 2 of the 20 timed steps refresh, with 30 3), max = a refresh step.

The first basis (an ``eigh`` per side and matrix) costs seconds, so it is built once per
sidedness: the other variants of that sidedness load the first one's state (and weights) and
change only their option. Each variant also reports ``rel_diff_vs_fp32``: the relative
difference of its first update from that of ``precondition_dtype=float32`` on the same state and
gradient (how much bf16 changes the step). ``--identity-init`` starts every basis at the
identity instead of ``eigh`` (seconds less; the timed steps do the same work, the refreshes
then power-iterate from it). ``--old-src DIR`` times the SOAP of another checkout
(``DIR/muongpt``) the same way, for a before/after in one call.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

D12_SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
VARIANTS = [  # (name, sidedness, options); the same names as the H200 results
    ("one-sided bf16 qr", True, {"orthonormalize": "qr"}),
    ("one-sided bf16 cholesky_qr", True, {"orthonormalize": "cholesky_qr"}),
    ("two-sided bf16 qr", False, {"orthonormalize": "qr"}),
    ("two-sided fp32 qr", False, {"precondition_dtype": "float32", "orthonormalize": "qr"}),
    ("two-sided bf16 cholesky_qr (default)", False, {"orthonormalize": "cholesky_qr"}),
]


def state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, list) else [value]:
                if torch.is_tensor(t):
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                    if key not in seen:
                        seen.add(key)
                        total += t.nbytes
    return total


class Bench:
    def __init__(self, device: torch.device, shapes, n_layer: int):
        self.device = device
        gen = torch.Generator(device).manual_seed(0)
        self.params = [
            torch.randn(*s, device=device, generator=gen).mul_(0.02).requires_grad_()
            for _ in range(n_layer)
            for s in shapes
        ]
        self.gen = gen

    def new_grads(self) -> None:
        for p in self.params:
            p.grad = torch.randn(p.shape, device=self.device, generator=self.gen)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, opt, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            self.new_grads()
            self.sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                opt.step()
                times.append(1e3 * (time.perf_counter() - t0))
        return times


def summarize(name: str, times: list[float], opt, extra: dict) -> dict:
    r = {
        "name": name,
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "max_ms": max(times),
        "state_bytes": state_bytes(opt),
        **extra,
    }
    diff = r.get("rel_diff_vs_fp32")
    print(
        f"{name:<38}{r['median_ms']:>9.2f}{r['mean_ms']:>9.2f}{r['max_ms']:>9.1f}"
        f"{r['state_bytes'] / 2**30:>9.3f}{r.get('first_step_s', float('nan')):>9.2f}"
        + (f"{diff:>10.2e}" if diff is not None else f"{'-':>10}"),
        flush=True,
    )
    return r


def first_update(bench: Bench, soap_cls, saved, weights, grads, options) -> torch.Tensor:
    """The update of one step from a given state, weights and gradient."""
    with torch.no_grad():
        for p, w, g in zip(bench.params, weights, grads):
            p.copy_(w)
            p.grad = g.clone()
    opt = soap_cls(bench.params, lr=3e-3)
    opt.load_state_dict(copy.deepcopy(saved))
    opt.param_groups[0].update(options)
    opt.step()
    return torch.cat([(p.detach() - w).flatten() for p, w in zip(bench.params, weights)])


def run_new(bench: Bench, args, results: list[dict], save) -> None:
    from muongpt.optim import SOAP

    for one_sided in (True, False):  # the cheap first basis first
        bench.new_grads()
        t0 = time.perf_counter()
        base = SOAP(bench.params, lr=3e-3, one_sided=one_sided)
        base.step()  # the statistics and first eigenbases
        bench.sync()
        first_s = time.perf_counter() - t0
        bench.time_steps(base, args.warmup - 1)
        saved = copy.deepcopy(base.state_dict())
        weights = [p.detach().clone() for p in bench.params]
        del base
        grads = [
            torch.randn(p.shape, device=bench.device, generator=bench.gen) for p in bench.params
        ]
        reference = first_update(
            bench, SOAP, saved, weights, grads, {"precondition_dtype": "float32"}
        )
        for name, sided, options in VARIANTS:
            if sided != one_sided:
                continue
            update = first_update(bench, SOAP, saved, weights, grads, options)
            rel = ((update - reference).norm() / reference.norm()).item()
            opt = SOAP(bench.params, lr=3e-3, one_sided=one_sided)
            with torch.no_grad():
                for p, w in zip(bench.params, weights):
                    p.copy_(w)
            opt.load_state_dict(copy.deepcopy(saved))
            opt.param_groups[0].update(options)
            bench.time_steps(opt, 1)  # restacks the loaded state; the step count is now warmup
            times = bench.time_steps(opt, args.steps)
            extra = {"one_sided": one_sided, **options, "rel_diff_vs_fp32": rel}
            extra["first_step_s"] = first_s
            results.append(summarize(name, times, opt, extra))
            save()
            del opt
        del saved


def run_old(bench: Bench, args, results: list[dict], save) -> None:
    sys.path.insert(0, str(Path(args.old_src).resolve()))
    for name in [m for m in sys.modules if m.startswith("muongpt")]:
        del sys.modules[name]
    old = importlib.import_module("muongpt.optim.soap")
    if args.identity_init:
        old.eigenbasis = args.identity
    bench.new_grads()
    t0 = time.perf_counter()
    opt = old.SOAP(bench.params, lr=3e-3)
    opt.step()
    bench.sync()
    first_s = time.perf_counter() - t0
    bench.time_steps(opt, args.warmup - 1)
    times = bench.time_steps(opt, args.steps)
    results.append(summarize(f"old SOAP ({args.old_src})", times, opt, {"first_step_s": first_s}))
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--old-src", default=None, help="time this checkout's SOAP instead")
    parser.add_argument("--identity-init", action="store_true", help="first bases = identity")
    parser.add_argument("--out", default="results/soap_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes, n_layer = (
        ([(32, 32)] * 4 + [(128, 32), (32, 128)], 2) if args.small else (D12_SHAPES, 12)
    )
    bench = Bench(device, shapes, n_layer)
    if args.identity_init:
        identity = lambda s: torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)  # noqa: E731
        if args.old_src:
            args.identity = lambda s: identity(s[None])[0].clone()  # noqa: E731
        else:
            import muongpt.optim.soap as soap_module

            soap_module.eigenbasis = lambda s: identity(s).clone()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"SOAP step, {name}, torch {torch.__version__}, {len(bench.params)} matrices", flush=True)
    print(
        f"{'variant':<38}{'median':>9}{'mean':>9}{'max':>9}{'GiB':>9}{'init s':>9}{'vs fp32':>10}",
        flush=True,
    )
    results: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every variant: a run cut short keeps what it measured
        report = {
            "device": name,
            "torch": torch.__version__,
            "matrices": len(bench.params),
            "steps": args.steps,
            "warmup": args.warmup,
            "results": results,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")

    (run_old if args.old_src else run_new)(bench, args, results, save)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
