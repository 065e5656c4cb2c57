"""``training.parallel=fsdp``: the model fully sharded with PyTorch's FSDP2, and sharded checkpoints.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to each block, the embedding, the
head and (for what is left: value embeddings, scalars) the model itself, on a 1-D mesh of all
ranks. Every parameter becomes a DTensor holding 1/W of its rows in fp32 (the master weights);
FSDP all-gathers a block's parameters just before its forward (and again for its backward) and
reduce-scatters its gradients (the mean over ranks, in fp32) as soon as its backward is done,
overlapping the next block's. On CUDA, with ``training.autocast_bf16``, a ``MixedPrecisionPolicy``
gathers the parameters in bf16 for compute. The optimizers are ``muongpt.optim.fsdp``'s.

Checkpoints are folders ``step_NNNNNN.dcp`` written by ``torch.distributed.checkpoint``: each
rank writes its own shards of the model and optimizer state (keyed by parameter name, in the
single-process optimizers' layout), rank 0 adds ``trainer.pt`` (data position, counters, RNG,
config). They are written into a temporary folder that rank 0 renames once every rank is done,
so a run never sees half a checkpoint. ``load_sharded`` reads one into any number of ranks,
FSDP or a single process; ``train/checkpoint.consolidate`` turns one into the single-process
checkpoint dict (``muongpt sample``/``eval``/``export`` read ``.dcp`` folders through it).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from muongpt import MuonGPTError, error_line, full_disk_named

PARALLEL_MODES = ("replicate", "fsdp")
TRAINER_FILE = "trainer.pt"  # the non-sharded part of a .dcp checkpoint
SHARDED_KEYS = ("model", "optimizer")


def check_supported(t, world_size: int, converters=()) -> None:
    """One-line errors for what ``training.parallel=fsdp`` does not support (``converters``:
    ``kernels.converters``)."""
    if t.parallel not in PARALLEL_MODES:
        raise MuonGPTError(f"training.parallel must be one of {PARALLEL_MODES}, got {t.parallel!r}")
    if t.parallel != "fsdp":
        return
    if world_size < 2:
        raise MuonGPTError(
            "training.parallel=fsdp shards over ranks: launch with torchrun --nproc_per_node>=2 "
            "(one process trains with training.parallel=replicate)"
        )
    if t.compile and t.compile_mode != "blocks":
        raise MuonGPTError(
            "training.parallel=fsdp compiles each block: use training.compile_mode=blocks"
        )
    if t.compile_warmup_steps > 0:
        raise MuonGPTError("training.compile_warmup_steps is not supported with parallel=fsdp")
    if "bf16_tables" in converters:  # fully_shard flattens a unit's parameters in one dtype
        raise MuonGPTError(
            "kernels.converters: bf16_tables is not supported with training.parallel=fsdp "
            "(the root unit would mix bf16 tables with fp32 parameters); use training.parallel=replicate"
        )


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> None:
    """``fully_shard`` each block, the embedding and the head, then the root (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()  # fp32 compute (CPU, or autocast off)
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # FSDP2 cannot shard 0-dim parameters (the speed-run's backout lambda): they stay whole on
    # every rank, and the optimizer averages their gradients itself (optim/fsdp.py)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    units = [*model.blocks, getattr(model, "embed", None), getattr(model, "lm_head", None)]
    for unit in units:
        if unit is not None and any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on rank 0's CPU (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def sharded_state(model: nn.Module, optimizers: list) -> dict:
    """Model and optimizer state keyed by parameter name (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizers)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(path: Path, state: dict, is_main: bool) -> Path:
    """Collective: write ``state`` as the .dcp folder ``path`` (see the module doc)."""
    import torch.distributed.checkpoint as dcp

    pid = [os.getpid()]
    if dist.is_initialized():
        dist.broadcast_object_list(pid, src=0)  # one temporary name, rank 0's, for every rank
    tmp = path.with_name(f".{path.name}.tmp-{pid[0]}")
    try:
        with full_disk_named(path):
            dcp.save({k: state[k] for k in SHARDED_KEYS}, checkpoint_id=tmp)
            if is_main:
                rest = {k: v for k, v in state.items() if k not in SHARDED_KEYS}
                torch.save({**rest, "sharded": True}, tmp / TRAINER_FILE)
                if path.exists():  # an older run's checkpoint of the same step
                    shutil.rmtree(path)
                os.replace(tmp, path)
    finally:
        if dist.is_initialized():
            dist.barrier()  # the folder is complete before any rank goes on
        if is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_sharded(path: Path, model: nn.Module, optimizers: list) -> None:
    """Read a .dcp checkpoint's model and optimizer state into ``model`` / ``optimizers`` (FSDP
    on any number of ranks, or one process); hyperparameters stay as configured now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    hyper = [
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        for opt in optimizers
    ]
    state = sharded_state(model, optimizers)  # the layout to read into
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=path)
        except CheckpointException as e:  # a BaseException, its message every rank's traceback
            rank, (error, _) = next(iter(e.failures.items()))
            raise MuonGPTError(
                f"{path}: unreadable sharded checkpoint (rank {rank}: {error_line(error)})"
            ) from None
    set_state_dict(
        model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for opt, groups in zip(optimizers, hyper):
        for group, configured in zip(opt.param_groups, groups):
            group.update(configured)


def load_full(state: dict, model_config, optimizer_config, model: nn.Module, optimizers: list):
    """Read a single-process checkpoint dict into an FSDP model and its optimizers: rebuilt whole
    on the CPU, then each rank keeps its shards (``full_state_dict`` loading)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from muongpt.model import build_model
    from muongpt.optim import build_optimizer

    whole = build_model(model_config)
    whole.load_state_dict(state["model"])
    combined = build_optimizer(whole, optimizer_config)
    combined.load_state_dict(state["optimizer"])
    full = sharded_state(whole, combined.optimizers)
    hyper = [
        [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in optimizers
    ]
    set_state_dict(
        model,
        optimizers,
        model_state_dict=full["model"],
        optim_state_dict=full["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    for opt, groups in zip(optimizers, hyper):
        for group, configured in zip(opt.param_groups, groups):
            group.update(configured)
