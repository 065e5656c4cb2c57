"""`muongpt bench`: time the training steps of any experiment.

    muongpt bench experiment=speedrun_bench bench.steps=20 bench.warmup=3 bench.out=bench.json

Every argument is a Hydra override of the training config, except the ``bench.*`` ones:

    bench.steps=N      timed optimizer steps (default 20)
    bench.warmup=N     untimed steps first: compilation, autotuning, allocator warm-up (default 3)
    bench.split=N      extra steps timed segment by segment (default 5; 0 skips the split)
    bench.out=PATH     JSON report (default: none)

Reported: tokens/s over the timed steps (no synchronisation inside them), model FLOPs
utilisation, peak memory, compile seconds, and the split of a step into data / forward+backward /
optimizer, measured on separate steps with a device synchronisation around each segment.

FLOPs per token (PaLM appendix B convention, counting the full attention matrix):

    6 * N + 12 * d * sum over attention layers l of C_l

N: the parameters of every matmul, the lm_head included (embedding tables excluded: they are
lookups); d = n_embd; C_l the attention context of layer l: T = seq_len, or its sliding window
(``model.attn_window`` x its ``window_pattern`` fraction) where shorter; MLP-only layers have none.
Where attention is document-masked, T becomes each token's document (its part in the row), averaged
over the tokens of a few of the run's training batches (at 64K-token rows of the bench pack the row
overcounts attention 13-fold). A window schedule (``training.attn_window_start``), a batch ramp
(``training.batch_size_start``) and a row-length schedule (``training.seq_len_schedule``) are
switched off: steps run at the full window, batch and row. (With
full causal attention on every layer, and no document mask, this is PaLM's 6N + 12 L T d.) MFU =
FLOPs/token * tokens/s / peak, the peak being the GPU's dense bf16 FLOP/s (``peak_flops``:
H100/H200 SXM 989e12, H100 PCIe 756e12, A100 312e12) or ``MUONGPT_PEAK_FLOPS`` where set; on CPU,
or a GPU not in the table, no MFU is reported. Training state is not restored: benchmark a fresh
run, never one you mean to keep.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from muongpt import MuonGPTError
from muongpt.cli import probe_file, write_text

# Dense bf16 tensor-core FLOP/s by device name (first match wins; sparsity not counted).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
MFU_FORMULA = (
    "MFU = (6 N + 12 d sum_l C_l) * tokens/s / peak dense bf16 FLOP/s; C_l: a token's row, or its"
    " document where documents are masked, capped at layer l's window"
)


def peak_flops(device) -> float | None:
    """The device's peak dense bf16 FLOP/s (``MUONGPT_PEAK_FLOPS`` wins), None when unknown."""
    import torch

    if device.type != "cuda":
        return None
    if "MUONGPT_PEAK_FLOPS" in os.environ:
        return float(os.environ["MUONGPT_PEAK_FLOPS"])
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


BENCH_DEFAULTS = {"steps": 20, "warmup": 3, "split": 5, "out": ""}


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``bench.key=value`` arguments from the Hydra overrides."""
    opts, overrides = dict(BENCH_DEFAULTS), []
    for arg in argv:
        if not arg.startswith("bench."):
            overrides.append(arg)
            continue
        key, sep, value = arg[len("bench.") :].partition("=")
        if not sep or key not in BENCH_DEFAULTS:
            raise MuonGPTError(
                f"bad argument {arg!r}: expected bench.KEY=VALUE with KEY in {list(BENCH_DEFAULTS)}"
            )
        if key == "out":
            opts[key] = value
        else:
            try:
                opts[key] = int(value)
            except ValueError:
                raise MuonGPTError(f"{arg}: expected an integer") from None
    if opts["steps"] < 1 or opts["warmup"] < 0 or opts["split"] < 0:
        raise MuonGPTError("bench.steps must be >= 1, bench.warmup and bench.split >= 0")
    return opts, overrides


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from muongpt.config import CONF_DIR, register_configs

    register_configs()
    from muongpt.train.config_keys import check_config_keys, explain_override_error

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as e:  # Hydra raises several types; all mean a bad override
        if explained := explain_override_error(e):
            raise MuonGPTError(explained) from None
        # Hydra's first line often only says where ("... raised while composing config:")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
        raise MuonGPTError(f"invalid config: {' '.join(lines) or type(e).__name__}") from None
    check_config_keys(cfg)  # +training.max_step=10 would otherwise be benchmarked as if unset
    return cfg


def matmul_params(model) -> int:
    """Parameters that take part in a matmul: all of them but lookup tables and vectors."""
    tables = {id(p) for p in model.lookup_tables()}
    return sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in tables)


def flops_per_token(model, seq_len: int, tokens=None) -> float:
    """6 N (matmul weights) + 12 D sum_l C_l over the attention layers, C_l the layer's context:
    seq_len, or its sliding window where shorter. With ``tokens`` (rows of seq_len token ids) and
    a document-masked model, the row is each token's document instead (token-weighted mean). A
    layer with paired heads attends over twice the span, each token's heads split between two."""
    c = model.config
    paired = getattr(c, "paired_heads_of_layer", lambda i: False)
    window = getattr(c, "attn_window", 0)  # the speed-run model's sliding window
    spans = None  # each token's document length within its row
    if tokens is not None and c.masks_documents:
        spans = document_spans(tokens, c.bos_token).double()
    context = 0.0  # summed over the attention layers, each with its own window (window_pattern)
    for i in range(c.n_layer):
        if c.mixer_of_layer(i) == "attention":
            factor = 2 if paired(i) else 1
            cap = c.layer_window(i, window) if window else UNBOUNDED
            if spans is None:
                context += min(factor * seq_len, cap)
            else:
                context += float((factor * spans).clamp(max=cap).mean())
    return 6.0 * matmul_params(model) + 12.0 * context * c.n_embd


UNBOUNDED = 2**62


def document_spans(tokens, bos_token: int):
    """For each token of ``tokens`` (B, T), the length of its document's part in its row (the
    span a document mask lets the row's last token of that document see)."""
    import torch

    docs = (tokens == bos_token).cumsum(-1)  # as the model numbers documents
    docs = docs + torch.arange(tokens.size(0), device=tokens.device)[:, None] * (tokens.size(1) + 1)
    _, inverse, counts = torch.unique(docs.flatten(), return_inverse=True, return_counts=True)
    return counts[inverse].view_as(tokens)


def sample_training_rows(trainer, batches: int = 4):
    """Token ids (on CPU) of ``batches`` training micro-batches from the loader's position,
    which is then restored: the run is unchanged."""
    import torch

    state = trainer.train_loader.state_dict()
    rows = [next(trainer.train_loader)[0].cpu() for _ in range(batches)]
    trainer.train_loader.load_state_dict(state)
    return torch.cat(rows)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def split_step(trainer) -> dict[str, float]:
    """One training step with a synchronisation around each part: seconds of data,
    forward_backward and optimizer (``Trainer.train_step``'s own parts)."""
    from muongpt.train.trainer import StepClock

    clock = StepClock(trainer.device)
    trainer.train_step(clock)
    return clock.seconds


def run_bench(opts: dict, overrides: list[str]) -> dict:
    import torch

    from muongpt.train.trainer import Trainer

    cfg = compose_config(overrides)
    # The steady state: the window at its full size (as the FLOP count assumes), not the first
    # steps of a schedule that grows it.
    cfg.training.attn_window_start = 0
    cfg.training.batch_size_start = 0  # time full batches, as tokens/s counts them
    cfg.training.seq_len_schedule = []  # ... of full rows, as the FLOP count assumes
    need = opts["warmup"] + opts["steps"] + opts["split"]
    if cfg.training.max_steps < need:  # the lr schedule must cover every benchmarked step
        cfg.training.max_steps = need
        cfg.training.warmup_steps = min(cfg.training.warmup_steps, need)
        cfg.training.cooldown_steps = min(
            cfg.training.cooldown_steps, need - cfg.training.warmup_steps
        )
    with tempfile.TemporaryDirectory(prefix="muongpt-bench-") as run_dir:
        trainer = Trainer(cfg, run_dir)
        dev = trainer.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_times = []
        for _ in range(opts["warmup"]):
            t0 = time.perf_counter()
            trainer.train_step()
            _sync(dev)
            warm_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(opts["steps"]):
            last_loss = trainer.train_step()
        _sync(dev)
        timed = time.perf_counter() - t0
        splits = [split_step(trainer) for _ in range(opts["split"])]
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        rows = sample_training_rows(trainer)
        trainer.train_loader.close()
        model = trainer.model
        tokens_per_s = trainer.tokens_per_step * opts["steps"] / timed
        step_s = timed / opts["steps"]
        fpt = flops_per_token(model, cfg.training.seq_len, rows)
        peak_fl = peak_flops(dev)
        report = {
            "experiment": cfg.experiment_name,
            "overrides": overrides,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tokens_per_step": trainer.tokens_per_step,
            "grad_accum": trainer.grad_accum,
            "warmup_steps": opts["warmup"],
            "timed_steps": opts["steps"],
            "ms_per_step": 1e3 * step_s,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": fpt,
            "flop_formula": "6*N_matmul_params + 12*n_embd*sum_attention_layers(min(seq_len or document, layer window)) per token",
            "matmul_params": matmul_params(model),
            "mfu_formula": MFU_FORMULA,
            "peak_flops": peak_fl,
            # a GPU's peak FLOP/s says nothing about a CPU (or an unlisted GPU): no MFU there
            "mfu": fpt * tokens_per_s / peak_fl if peak_fl else None,
            "peak_mem_gib": peak,
            # the first warm-up step compiles; the others autotune / settle the allocator
            "compile_s": sum(warm_times) - step_s * len(warm_times) if warm_times else 0.0,
            "warmup_step_s": warm_times,
            "last_train_loss": float(last_loss),
            "fp8_head": bool(getattr(model.lm_head, "fp8_ok", False)),
            "converters": list(cfg.kernels.converters),
        }
        if splits:
            report["split_ms"] = {
                k: 1e3 * statistics.median(s[k] for s in splits) for k in splits[0]
            }
        trainer.close()
    return report


def mfu_text(r: dict) -> str:
    if r.get("mfu") is None:
        return "n/a (peak FLOP/s known for the GPUs in PEAK_BF16_FLOPS only)"
    return f"{100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s"


BENCH_HELP = """\
Time training steps of an experiment: tokens/s, MFU (GPUs), peak memory, compile time and the
split of a step into data / forward+backward / optimizer. Nothing is saved but bench.out.
Arguments are Hydra overrides of the training config, plus:
  bench.steps=N     timed optimizer steps (default 20)
  bench.warmup=N    untimed steps first: compilation, autotuning (default 3)
  bench.split=N     extra steps timed segment by segment (default 5; 0 skips)
  bench.out=PATH    also write the report as JSON
e.g.  muongpt bench experiment=speedrun_bench bench.steps=20 bench.out=bench.json"""


def print_table(r: dict) -> None:
    rows = [
        ("experiment", r["experiment"]),
        ("device / torch", f"{r['device']} / {r['torch']}"),
        ("tokens/step", f"{r['tokens_per_step']:,} ({r['grad_accum']} micro-steps)"),
        ("ms/step", f"{r['ms_per_step']:.1f}"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("MFU", mfu_text(r)),
        ("peak memory", "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"),
        ("compile", f"{r['compile_s']:.1f} s"),
        ("fp8 head", str(r["fp8_head"])),
    ]
    if "split_ms" in r:
        s = r["split_ms"]
        rows.append(
            (
                "split (synced)",
                f"data {s['data']:.1f} / fwd+bwd {s['forward_backward']:.1f} / "
                f"optimizer {s['optimizer']:.1f} ms",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from muongpt.train.config_keys import command_help

        print(command_help("muongpt bench", BENCH_HELP))
        return 0
    try:
        opts, overrides = parse_args(argv)
        if opts["out"]:  # before the benchmark: an unwritable path should not cost a run
            probe_file(opts["out"], "bench.out")
        report = run_bench(opts, overrides)
        if opts["out"]:
            write_text(opts["out"], json.dumps(report, indent=2) + "\n", "bench.out")
    except MuonGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
