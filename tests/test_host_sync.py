"""A training step between clock reads makes no device->host synchronisation.

On a GPU the host queues a step's kernels while the device still runs the previous step's: one
value read back from the device (``.item()``, ``bool(t)``, ``nonzero``, a boolean mask) in the
step empties that queue and leaves the GPU idle while the host catches up. The trainer reads the
loss only at log steps (``Trainer.clock_read_at``). These tests run the speed-run model's step on
the CPU under a dispatch mode that records every operator that would wait for the device.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import muongpt
from kernel_marks import needs_interpreter
from muongpt.kernels import muon_pointwise, newton_schulz, relu2_mlp
from muongpt.model.masks import document_block_mask
from muongpt.model.speedrun import documents
from test_resume import make_trainer

PACKAGE = str(Path(muongpt.__file__).parent)
# operators whose result the host must wait for (a scalar read back, a data-dependent shape);
# boolean-mask indexing and repeat_interleave by a tensor too (``HostReads.syncs``)
SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2"}

# the speed-run parts of experiment=speedrun_bench, small, with a row-length schedule, a batch
# ramp and the lr scaled with the step's tokens
SPEEDRUN_STEP = [
    "model=speedrun",
    "model.n_layer=4",
    "model.value_embeds=1",
    "model.bigram_rows=64",
    "model.backout_after=2",
    "model.gate_dims=4",
    "model.mlp_free_layers=[0]",
    "model.tie_embed_head=true",
    "model.mixing.pattern=[attention,attention,none,attention]",
    "optimizer.normuon=true",
    "training.log_every=100",
    "training.eval_every=100",
    "training.max_steps=12",
    "training.attn_window_start=8",
    "training.seq_len_schedule=[16,32]",
    "training.micro_batch_size=2",
    "training.batch_size_start=2",
    "training.batch_ramp_steps=4",
    "training.lr_token_power=0.5",
    "kernels.converters=[bf16_tables]",
]


class HostReads(TorchDispatchMode):
    """Records the syncing operators called, with the innermost muongpt frame that called them.
    ``ignore``: tensors whose reads are not device syncs (optimizer step counts, CPU-resident on a
    GPU as well, for torch's non-capturable optimizers)."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = {t.data_ptr() for t in ignore}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.syncs(func, args, kwargs):
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            where = f"{frames[-1].filename[len(PACKAGE) :]}:{frames[-1].lineno}" if frames else "?"
            self.reads.append(f"{func.__name__} from {where}")
        return func(*args, **kwargs)

    def syncs(self, func, args, kwargs) -> bool:
        name = func.__name__.split(".")[0]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in SYNCING:
            return not all(t.data_ptr() in self.ignore for t in tensors)
        if name in ("index", "index_put", "index_put_"):  # a boolean mask: its count of Trues
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if func is torch.ops.aten.repeat_interleave.Tensor:  # the output's size is the sum
            return kwargs.get("output_size") is None
        return False


def step_counts(optimizer) -> list[torch.Tensor]:
    return [
        s["step"]
        for opt in optimizer.optimizers
        for s in opt.state.values()
        if isinstance(s.get("step"), torch.Tensor)
    ]


def test_speedrun_training_steps_read_nothing_back_from_the_device(tmp_path):
    """Steps 3-8 (no log, evaluation or checkpoint step among them; the batch ramp, the window
    schedule and the change of row length inside) call no syncing operator; with
    ``training.max_bad_steps=1`` the non-finite guard reads the loss at every step (one
    ``_local_scalar_dense`` per step), which shows the recorder sees a read."""
    trainer = make_trainer(tmp_path, *SPEEDRUN_STEP, "training.checkpoint_every=0")
    for _ in range(2):  # the optimizers' states exist from the first step
        trainer.train_step()
    with HostReads(ignore=step_counts(trainer.optimizer)) as recorder:
        for _ in range(6):
            assert not trainer.clock_read_at(trainer.step + 1)
            trainer.train_step()
    assert trainer.train_loader.T == 32  # the row length changed inside
    assert recorder.reads == []
    trainer.close()

    (tmp_path / "guarded").mkdir()
    guarded = make_trainer(tmp_path / "guarded", *SPEEDRUN_STEP, "training.max_bad_steps=1")
    for _ in range(2):
        guarded.train_step()
    with HostReads(ignore=step_counts(guarded.optimizer)) as recorder:
        for _ in range(3):
            guarded.train_step()
    assert len(recorder.reads) == 3 and all("resilience.py" in r for r in recorder.reads)
    guarded.close()


def test_the_flex_block_mask_is_built_without_reading_the_device():
    """The FlexAttention mask (built eagerly in the compiled model, on the GPU) of a batch with
    several documents and a window held in a tensor: no syncing operator."""
    idx = torch.randint(0, 50_000, (2, 1024), generator=torch.Generator().manual_seed(0))
    idx[:, ::300] = 50256
    with HostReads() as recorder:
        mask = document_block_mask(documents(idx, 50256), torch.tensor(256, dtype=torch.int32))
    assert recorder.reads == [] and mask.kv_num_blocks.shape == (2, 1, 8)


def test_the_recorder_sees_each_kind_of_read():
    """Reads that wait for the device are recorded (a scalar, a boolean mask, a count of
    nonzeros, a tensor of repeats); reads of known size are not."""
    x = torch.randn(6)
    reads = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x[0] > 0),
        "mask": lambda: x[x > 0],
        "masked write": lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0)),
        "nonzero": lambda: torch.nonzero(x),
        "repeats": lambda: torch.repeat_interleave(x, torch.full((6,), 2)),
    }
    for what, read in reads.items():
        with HostReads() as recorder:
            read()
        assert len(recorder.reads) == 1, what
    with HostReads() as recorder:
        x[torch.tensor([0, 2])], x.repeat_interleave(2), torch.where(x > 0, x, 0)
        torch.repeat_interleave(x, torch.full((6,), 2), output_size=12)
    assert recorder.reads == []


@needs_interpreter
def test_the_triton_kernels_launch_without_reading_the_device():
    """The launch code of Muon's kernels (the symmetric products, the momentum and update
    passes) and of the fused ReLU² MLP, run under Triton's interpreter on CPU tensors: no
    syncing operator (a grid sized from a tensor's values would be one)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 32, 48, generator=g).to(torch.bfloat16)
    grads = [torch.randn(32, 48, generator=g) for _ in range(2)]
    bufs = [torch.zeros(32, 48) for _ in range(2)]
    weights = [torch.randn(32, 48, generator=g) for _ in range(2)]
    x, w1 = torch.randn(64, 32, generator=g), torch.randn(128, 32, generator=g)
    small = relu2_mlp.GemmConfig(32, 64, 32, 4, 2, 4)  # few interpreted programs
    stack = torch.empty(2, 32, 48, dtype=torch.bfloat16)
    with HostReads() as recorder:
        a = newton_schulz.symmetric_gram(y)
        b = newton_schulz.symmetric_gram(a, a, alpha=0.5, beta=1.0)
        newton_schulz.poly_times(b, y, 2.0, product="triton")
        muon_pointwise.momentum_into_stack(grads, bufs, stack, 2, 0.9, True)
        muon_pointwise.apply_stack(weights, stack, False, 0.1, 0.0, False, 1.0)
        for kernel in relu2_mlp.KERNELS:
            post = relu2_mlp.fc_relu2_kernel(x, w1, small, kernel)
            relu2_mlp.grad_pre_kernel(x, w1.T.contiguous(), post, small, kernel)
    assert recorder.reads == []
    # the kernels ran, not their PyTorch forms
    assert newton_schulz.kernel_usable(y) and muon_pointwise.kernel_usable(stack, grads, bufs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_speedrun_steps_on_cuda_never_synchronize(tmp_path):
    """On a GPU, with the speed run's converters and compilation: after the compile warm-up (as
    the speed run does it: every row length compiled, then undone) and four steps, three steps
    across the change of row length under ``torch.cuda.set_sync_debug_mode("error")``, which
    raises at any call that waits for the device (a scalar read, a blocking copy, a stream
    synchronization)."""
    from muongpt.train.trainer import compile_warmup

    cuda = {
        "model.n_embd": "128",
        "model.attn_window": "256",
        "training.device": "cuda",
        "training.compile": "true",
        "training.seq_len": "256",
        "training.seq_len_schedule": "[128,256]",
        "training.attn_window_start": "128",
        "training.checkpoint_every": "0",
        "kernels.converters": "[flex_attention,compiled_block_lists,fp8_head_loss,fused_mlp,"
        "bf16_tables,segmented_table_grads]",
    }
    kept = [o for o in SPEEDRUN_STEP if o.split("=")[0] not in cuda]
    trainer = make_trainer(tmp_path, *kept, *(f"{k}={v}" for k, v in cuda.items()))
    compile_warmup(trainer, 2)
    for _ in range(4):  # the batch ramp's steps; row length 128 until step 6
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.step == 7 and trainer.train_loader.T == 256
    assert bool(torch.isfinite(torch.stack(losses)).all())
    trainer.close()
