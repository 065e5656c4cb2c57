"""Process-group setup for torchrun, kept apart from the model and the loop."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from muongpt import MuonGPTError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise MuonGPTError("training.device=cuda but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise MuonGPTError(f"training.device must be auto, cpu or cuda, got {requested!r}")
    return torch.device("cpu")


def init_distributed(requested_device: str) -> DistContext:
    """Read torchrun's environment; start a process group when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise MuonGPTError(
                "NCCL is not available in this PyTorch build; cannot train on several GPUs"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    return DistContext(rank, local_rank, world_size, device)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(
            value, op=dist.ReduceOp.AVG if ctx.device.type == "cuda" else dist.ReduceOp.SUM
        )
        if ctx.device.type != "cuda":  # gloo has no AVG
            value /= ctx.world_size
    return value


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
