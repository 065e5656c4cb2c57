"""`muongpt bench`: its arguments, --help, unknown keys and the MFU line (no timing asserted)."""

import pytest
import torch

from muongpt.cli import bench


def run(argv, capsys):
    rc = bench.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_does_not_fail(capsys):
    rc, out, err = run(["--help"], capsys)
    assert rc == 0 and err == ""
    assert out.startswith("usage: muongpt bench") and "bench.steps=N" in out
    assert "training.max_steps=N" in out and len(out.splitlines()) < 45


def test_unknown_key_with_plus_is_refused_with_a_suggestion(capsys):
    rc, out, err = run(["+training.max_step=10", "bench.steps=1"], capsys)
    assert rc == 2 and out == ""
    assert (
        err == "error: unknown key training.max_step (did you mean max_steps or max_bad_steps?)\n"
    )


def test_unwritable_out_is_named_before_the_benchmark(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, out, err = run([f"bench.out={blocker}/b.json", "bench.steps=1"], capsys)
    assert rc == 2 and out == ""
    assert (
        err
        == f"error: bench.out: cannot create folder {blocker} ({blocker} is a file, not a folder)\n"
    )


def test_mfu_is_not_claimed_on_cpu():
    report = {"mfu": None, "peak_flops": None}
    assert bench.mfu_text(report) == "n/a (peak FLOP/s known for the GPUs in PEAK_BF16_FLOPS only)"
    assert bench.mfu_text({"mfu": 0.25, "peak_flops": 989e12}) == "25.0% of 989 TFLOP/s"


def test_peak_flops_by_gpu_name_and_the_override(monkeypatch):
    """MFU's denominator: the dense bf16 peak of the GPU by name (an H100 PCIe is not an SXM
    H100), none for a CPU or an unlisted GPU, and MUONGPT_PEAK_FLOPS above all."""
    import torch

    cuda = torch.device("cuda")
    monkeypatch.delenv("MUONGPT_PEAK_FLOPS", raising=False)
    for name, peak in [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert bench.peak_flops(cuda) == peak, name
    assert bench.peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("MUONGPT_PEAK_FLOPS", "1.5e14")
    assert bench.peak_flops(cuda) == 1.5e14


def test_flops_per_token_counts_each_layers_attention_context():
    """12 d C_l per attention layer: C_l its window (or the sequence), twice the sequence for a
    layer with paired heads (2T positions of H/2 heads), nothing for an MLP-only layer."""
    from muongpt.model import SpeedrunConfig, build_model
    from muongpt.model.gpt import MixingConfig

    kw = dict(vocab_size=300, n_layer=4, n_head=4, n_embd=32, value_embeds=1, bigram_rows=211)
    kw.update(backout_after=2, window_pattern=[1.0, 0.5], attn_window=64)
    kw.update(mixing=MixingConfig(["attention", "attention", "attention", "none"]))
    model = build_model(SpeedrunConfig(**kw))
    matmuls = 6.0 * bench.matmul_params(model)
    # windows 64, 32, 64 (layer 3 has no attention); seq_len 48 caps the long ones
    assert bench.flops_per_token(model, 48) == matmuls + 12 * 32 * (48 + 32 + 48)
    paired = build_model(SpeedrunConfig(**kw, paired_head_layers=[0, 1]))
    # paired: 96 positions, so the 64-token window is the context of layer 0
    assert bench.flops_per_token(paired, 48) == matmuls + 12 * 32 * (64 + 32 + 48)


def test_flops_per_token_counts_documents_where_attention_masks_them():
    """With a document mask a token's context is its document's part of the row (capped by the
    window), averaged over the tokens; without one the rows' documents change nothing."""
    from muongpt.model import GPTConfig, SpeedrunConfig, build_model
    from muongpt.model.gpt import MixingConfig

    bos = 299
    rows = torch.randint(0, bos, (2, 48))
    rows[0, [0, 8, 40]] = bos  # documents of 8, 32, 8 tokens
    rows[1, 0] = bos  # one document of 48
    # token-weighted mean of min(span, cap): (8*8 + 32*32 + 8*8 + 48*48) / 96 for cap >= 48
    mean_span = (8 * 8 + 32 * 32 + 8 * 8 + 48 * 48) / 96
    capped = (8 * 8 + 32 * 32 + 8 * 8 + 48 * 32) / 96  # window 32

    kw = dict(vocab_size=300, n_layer=4, n_head=4, n_embd=32, value_embeds=1, bigram_rows=211)
    kw.update(backout_after=2, window_pattern=[1.0, 0.5], attn_window=64, bos_token=bos)
    kw.update(mixing=MixingConfig(["attention", "attention", "attention", "none"]))
    model = build_model(SpeedrunConfig(**kw))  # masks documents always
    matmuls = 6.0 * bench.matmul_params(model)
    got = bench.flops_per_token(model, 48, rows)
    assert got == pytest.approx(matmuls + 12 * 32 * (mean_span + capped + mean_span))

    plain = dict(vocab_size=300, n_layer=2, n_head=4, n_embd=32, bos_token=bos)
    masked = build_model(GPTConfig(**plain, doc_mask=True))
    unmasked = build_model(GPTConfig(**plain))
    matmuls = 6.0 * bench.matmul_params(masked)
    assert bench.flops_per_token(masked, 48, rows) == pytest.approx(
        matmuls + 12 * 32 * 2 * mean_span
    )
    assert bench.flops_per_token(unmasked, 48, rows) == matmuls + 12 * 32 * 2 * 48


@pytest.mark.slow
def test_a_small_bench_on_the_cpu_times_full_steps_and_splits_them(tmp_path, capsys, monkeypatch):
    """The whole command on a narrowed tiny model: two micro-steps per step, the batch ramp and
    the row-length schedule switched off (full batches of full rows, as tokens/s counts them),
    and the synchronised split of a step into its three segments."""
    import json

    from muongpt.train.trainer import Trainer

    step_tokens, train_step = [], Trainer.train_step

    def counted(self, *args):
        loss = train_step(self, *args)
        step_tokens.append(self.last_step_tokens)
        return loss

    monkeypatch.setattr(Trainer, "train_step", counted)
    out = tmp_path / "bench.json"
    small = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "training.seq_len=32"]
    batch = ["training.batch_size=4", "training.micro_batch_size=2"]
    schedules = [
        "training.batch_size_start=2",
        "training.batch_ramp_steps=10",
        "training.seq_len_schedule=[16,32]",
    ]
    argv = ["experiment=tiny", "training.device=cpu", *small, *batch, *schedules]
    rc, stdout, err = run([*argv, "bench.steps=2", "bench.warmup=1", "bench.split=2",
                           f"bench.out={out}"], capsys)  # fmt: skip
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["tokens_per_step"] == 4 * 32 and report["grad_accum"] == 2
    assert step_tokens == [4 * 32] * 5  # warm-up, timed and split steps
    assert set(report["split_ms"]) == {"data", "forward_backward", "optimizer"}
    assert all(ms > 0 for ms in report["split_ms"].values())
    assert "split (synced)" in stdout
