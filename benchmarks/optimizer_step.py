"""Time one optimizer step over the d12 parameter set, and the optimizer state it holds.

    python benchmarks/optimizer_step.py --out results/optimizer_step.json           # one GPU
    python benchmarks/optimizer_step.py --device cpu --small --out /tmp/opt.json    # smoke test

The parameters are those of muongpt's GPT d12 (built directly, no forward pass): 12 blocks, each
with q, k, v, proj 768x768 (the model keeps q, k, v separate), mlp fc 3072x768 and mlp proj
768x3072; embed and lm_head 50304x768. Gradients are fixed random tensors. Entries:

- muongpt Muon (polar_express, and classic) over the 72 block matrices; on CUDA also polar_express
  with the Newton-Schulz Gram products as plain cuBLAS bmm instead of the symmetric Triton kernel
  (``kernels/newton_schulz.py``), to show what the kernel itself buys, with its TMA variant, with
  the pointwise work in PyTorch instead of the Triton kernels (``kernels/muon_pointwise.py``), and
  with the Triton a X + B X (``PRODUCT = "triton"``)
- muongpt NorMuon over the speed-run set (``experiment=speedrun_bench``: layer 7 is MLP-only, so
  44 attention matrices + 24 MLP ones, and NorMuon on)
- torch.optim.Muon (torch >= 2.9; it loops over the matrices one by one) over the same matrices
- torch.optim.AdamW fused, over every parameter
- AdamW over the speed run's side tables (the fp32 tied embedding and head, three bf16
  value-embedding tables, the bf16 bigram table: 348M parameters): torch's fused, and
  ``KernelAdamW`` (one Triton kernel per tensor, ``optimizer.adamw_kernel``)
- muongpt SOAP over the block matrices (refresh every 10 steps: median = a plain step,
  mean = amortised over refreshes, max = a refresh step): the default (bf16 matmuls on CUDA,
  Cholesky-QR refresh), with fp32 matmuls, with Householder QR, one-sided (only the smaller side
  preconditioned), one-sided with Householder QR
- the muongpt hybrids (build_optimizer with optimizer=muon / soap) over every parameter

Each entry: warm-up steps, then per-step times (CUDA events on GPU) -> median and mean. Memory:
``state_bytes`` sums the optimizer's state tensors; on CUDA ``peak_bytes`` is the peak allocation
of a step above what was allocated before the optimizer existed (state + step temporaries).
``--train-step-ms`` (a measured d12 training step of 131,072 tokens) adds each entry's share of it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from muongpt.optim import SOAP, Muon, MuonConfig, SOAPConfig, build_optimizer
from muongpt.optim.adamw import KernelAdamW

ns_module = sys.modules["muongpt.optim.newton_schulz"]  # the package exports the function by name


class ParamSet(nn.Module):
    """GPT-shaped parameters with muongpt's names and the GPT's optimizer groups."""

    def __init__(self, n_layer: int, n_embd: int, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(n_embd=n_embd, n_layer=n_layer)
        self.embed = nn.Embedding(vocab, n_embd)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            block = nn.Module()
            block.mixer = nn.Module()
            for name in ("q", "k", "v", "proj"):
                setattr(block.mixer, name, nn.Linear(n_embd, n_embd, bias=False))
            block.mlp = nn.Module()
            block.mlp.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            block.mlp.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
            self.blocks.append(block)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def block_matrices(self) -> list[nn.Parameter]:
        return list(self.blocks.parameters())

    def optimizer_groups(self) -> dict:
        return {
            "matrix": list(self.blocks.named_parameters(prefix="blocks")),
            "embed": list(self.embed.named_parameters(prefix="embed")),
            "head": list(self.lm_head.named_parameters(prefix="lm_head")),
            "scalar": [],
        }


def speedrun_tables(vocab: int, n_embd: int, bigram_rows: int, device) -> list[nn.Parameter]:
    """The side groups' large tensors of ``experiment=speedrun_bench`` with ``bf16_tables``: the
    tied embedding and head (fp32), three value-embedding tables and the bigram table (bf16),
    with random gradients."""
    shapes = [(vocab, n_embd, torch.float32)] + [(vocab, n_embd, torch.bfloat16)] * 3
    shapes.append((bigram_rows, n_embd, torch.bfloat16))
    tables = [nn.Parameter(torch.randn(r, c, device=device).to(dtype)) for r, c, dtype in shapes]
    for t in tables:
        t.grad = torch.randn_like(t)
    return tables


def state_bytes(optimizers) -> int:
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            stack = list(state.values())
            while stack:
                value = stack.pop()
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
                elif isinstance(value, list | tuple):
                    stack.extend(value)
    return total


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(True), torch.cuda.Event(True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


KERNEL_USABLE = getattr(ns_module, "kernel_usable", None)  # None: a version without the kernel
GRAM = sys.modules.get("muongpt.kernels.newton_schulz")
GRAM_KERNEL = getattr(GRAM, "KERNEL", None)
GRAM_PRODUCT = getattr(GRAM, "PRODUCT", None)  # None: a version without the Triton a X + B X
POINTWISE = sys.modules.get("muongpt.kernels.muon_pointwise")  # None: a version without them
POINTWISE_USABLE = getattr(POINTWISE, "kernel_usable", None)


def without_gram_kernel(make):
    """``make``, with Newton-Schulz's Gram products on torch.bmm / baddbmm while it runs."""

    def patched():
        ns_module.kernel_usable = lambda x: False
        return make()

    return patched


def with_gram_kernel(kernel: str, make):
    """``make``, with the Gram kernel variant ``kernel`` while it runs."""

    def patched():
        GRAM.KERNEL = kernel
        return make()

    return patched


def with_torch_pointwise(make):
    """``make``, with Muon's pointwise work in PyTorch while it runs."""

    def patched():
        POINTWISE.kernel_usable = lambda *args: False
        return make()

    return patched


def with_triton_product(make):
    """``make``, with the Triton a X + B X while it runs."""

    def patched():
        GRAM.PRODUCT = "triton"
        return make()

    return patched


def restore_gram_kernel() -> None:
    """Undo an entry's patch."""
    if KERNEL_USABLE is not None:
        ns_module.kernel_usable = KERNEL_USABLE
        GRAM.KERNEL = GRAM_KERNEL
    if GRAM_PRODUCT is not None:
        GRAM.PRODUCT = GRAM_PRODUCT
    if POINTWISE_USABLE is not None:
        POINTWISE.kernel_usable = POINTWISE_USABLE


def run_entry(name, make, params, device, args) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    opt = make()
    optimizers = getattr(opt, "optimizers", [opt])
    times = time_steps(opt.step, device, args.warmup, args.steps)
    result = {
        "name": name,
        "tensors": len(params),
        "params": sum(p.numel() for p in params),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "state_bytes": state_bytes(optimizers),
        "peak_bytes": None,
    }
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
    del opt, optimizers
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--train-step-ms", type=float, default=None)
    parser.add_argument("--out", default="results/optimizer_step.json")
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: run the entries whose name has one"
    )
    args = parser.parse_args()
    if args.small and args.steps == 50:
        args.steps, args.warmup = 5, 2

    device = torch.device(args.device)
    n_layer, n_embd, vocab = (2, 64, 512) if args.small else (12, 768, 50304)
    torch.manual_seed(0)
    with torch.device(device):
        model = ParamSet(n_layer, n_embd, vocab).to(getattr(torch, args.param_dtype))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    everything = list(model.parameters())
    wanted = [w for w in args.only.split(",") if w]

    def selected(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    fused = device.type == "cuda"
    table_entries = (f"torch AdamW{' fused' if fused else ''}, speedrun tables",
                     "muongpt KernelAdamW, speedrun tables")  # fmt: skip
    tables = []  # 348M parameters with their gradients: made only for entries that step them
    if any(selected(name) for name in table_entries):
        rows = 64 if args.small else 251520
        tables = speedrun_tables(vocab, n_embd, bigram_rows=rows, device=device)
    matrices = model.block_matrices()
    mlp_only = {id(p) for p in model.blocks[7 % n_layer].mixer.parameters()}
    speedrun_matrices = [p for p in matrices if id(p) not in mlp_only]

    entries = [
        ("muongpt Muon polar_express", lambda: Muon(matrices, lr=0.05), matrices),
        (
            "muongpt Muon classic",
            lambda: Muon(matrices, lr=0.05, ns_coefficients="classic"),
            matrices,
        ),
    ]
    if device.type == "cuda" and KERNEL_USABLE is not None:
        entries.append(
            (
                "muongpt Muon pe, bmm Gram",
                without_gram_kernel(lambda: Muon(matrices, lr=0.05)),
                matrices,
            )
        )
        entries.append(
            ("muongpt Muon pe, tma Gram", with_gram_kernel("tma", lambda: Muon(matrices, lr=0.05)),
             matrices)
        )  # fmt: skip
    if device.type == "cuda" and POINTWISE_USABLE is not None:
        entries += [
            ("muongpt Muon pe, torch pointwise",
             with_torch_pointwise(lambda: Muon(matrices, lr=0.05)), matrices),
            ("muongpt Muon pe, triton aX+BX",
             with_triton_product(lambda: Muon(matrices, lr=0.05)), matrices),
        ]  # fmt: skip
    entries.append(
        (
            "muongpt NorMuon speedrun set",
            lambda: Muon(speedrun_matrices, lr=0.05, normuon=True),
            speedrun_matrices,
        )
    )
    if device.type == "cuda" and POINTWISE_USABLE is not None:
        entries.append(
            ("muongpt NorMuon speedrun set, torch pointwise",
             with_torch_pointwise(lambda: Muon(speedrun_matrices, lr=0.05, normuon=True)),
             speedrun_matrices)
        )  # fmt: skip
    if hasattr(torch.optim, "Muon"):
        entries.append(
            (
                "torch.optim.Muon",
                lambda: torch.optim.Muon(
                    matrices, lr=0.05, weight_decay=0.0, adjust_lr_fn="original"
                ),
                matrices,
            )
        )
    entries += [
        (
            f"torch AdamW{' fused' if fused else ''} (all)",
            lambda: torch.optim.AdamW(everything, lr=3e-3, fused=fused or None),
            everything,
        ),
        (
            table_entries[0],
            lambda: torch.optim.AdamW(tables, lr=3e-3, betas=(0.5, 0.95), fused=fused or None),
            tables,
        ),
        (table_entries[1], lambda: KernelAdamW(tables, lr=3e-3, betas=(0.5, 0.95)), tables),
        ("muongpt SOAP", lambda: SOAP(matrices, lr=3e-3), matrices),
        (
            "SOAP fp32 matmuls",
            lambda: SOAP(matrices, lr=3e-3, precondition_dtype="float32"),
            matrices,
        ),
        (
            "SOAP Householder qr",
            lambda: SOAP(matrices, lr=3e-3, orthonormalize="qr"),
            matrices,
        ),
        ("SOAP one-sided", lambda: SOAP(matrices, lr=3e-3, one_sided=True), matrices),
        (
            "SOAP one-sided qr",
            lambda: SOAP(matrices, lr=3e-3, one_sided=True, orthonormalize="qr"),
            matrices,
        ),
        (
            "hybrid muon (all)",
            lambda: build_optimizer(model, MuonConfig()),
            everything,
        ),
        (
            "hybrid soap (all)",
            lambda: build_optimizer(model, SOAPConfig(lr=3e-3)),
            everything,
        ),
    ]
    results = []
    for name, make, params in entries:
        if not selected(name):
            continue
        try:
            results.append(run_entry(name, make, params, device, args))
        except Exception as e:  # one entry failing (e.g. a kernel) must not lose the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        finally:
            restore_gram_kernel()

    by_name = {r["name"]: r for r in results}
    reference = by_name.get("torch.optim.Muon")
    for r in results:
        r["vs_torch_muon"] = r["median_ms"] / reference["median_ms"] if reference else None
        r["frac_of_train_step"] = (
            r["median_ms"] / args.train_step_ms if args.train_step_ms else None
        )
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    report = {
        "device": device_name or device.type,
        "torch": torch.__version__,
        "shapes": {"n_layer": n_layer, "n_embd": n_embd, "vocab": vocab, "qkv": "separate"},
        "param_dtype": args.param_dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_step_ms": args.train_step_ms,
        "gram_kernel_failed": dict(getattr(GRAM, "FAILED", {})),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"optimizer step, {report['device']}, torch {torch.__version__}, {args.param_dtype}")
    header = f"{'optimizer':<26}{'tensors':>8}{'params':>13}{'median ms':>11}{'mean ms':>10}"
    header += f"{'max ms':>9}{'state MiB':>11}{'peak MiB':>10}{'/torch':>8}{'/train':>8}"
    print(header)
    for r in results:
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
        ratio = f"{r['vs_torch_muon']:.2f}" if r["vs_torch_muon"] is not None else "-"
        frac = f"{r['frac_of_train_step']:.1%}" if r["frac_of_train_step"] is not None else "-"
        print(
            f"{r['name']:<26}{r['tensors']:>8}{r['params']:>13,}{r['median_ms']:>11.2f}"
            f"{r['mean_ms']:>10.2f}{r['max_ms']:>9.1f}{r['state_bytes'] / 2**20:>11.1f}{peak:>10}{ratio:>8}{frac:>8}"
        )
    if getattr(GRAM, "FAILED", None):
        print(f"Gram kernels that fell back to torch.bmm: {GRAM.FAILED}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
