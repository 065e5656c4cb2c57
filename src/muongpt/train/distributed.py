"""Process-group setup for torchrun, kept apart from the model and the loop.

A run under ``torchrun --nproc_per_node=N [--nnodes=M ...]`` has no DDP wrapper: the optimizers
(``muongpt.optim.distributed``) reduce the gradients themselves. This module starts the process
group (NCCL on GPUs, gloo on CPUs), shares one Hydra run directory between the ranks, and makes
every rank stop with one clear error (printed by rank 0) when a rank fails to set up or the
ranks resolved different configs, instead of hanging in the first collective.

``MUONGPT_DIST_TIMEOUT_S`` (default 1800) bounds how long a collective waits for a rank that
does not arrive (torchrun itself stops all ranks when one exits with an error).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from muongpt import MuonGPTError

DEFAULT_TIMEOUT_S = 1800.0


class DistributedSetupError(MuonGPTError):
    """Raised on every rank when any rank failed to start; rank 0 prints it, the others exit."""

    reported_by_rank0 = True


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


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError("training.device=cuda but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise MuonGPTError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank} but only {count} are visible; "
                "use --nproc_per_node <= the GPUs per node"
            )
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise MuonGPTError(f"training.device must be auto, cpu or cuda, got {requested!r}")
    return torch.device("cpu")


def timeout() -> timedelta:
    value = os.environ.get("MUONGPT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise MuonGPTError(
            f"MUONGPT_DIST_TIMEOUT_S must be a number of seconds, got {value!r}"
        ) from None
    return timedelta(seconds=seconds)


def init_distributed(requested_device: str) -> DistContext:
    """Read torchrun's environment; start a process group when there is more than one rank.

    Idempotent: a process group that is already up (``muongpt-train`` starts it before Hydra, to
    agree on the run directory) is reused.
    """
    world_size = env_world_size()
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise DistributedSetupError(
                "NCCL is not available in this PyTorch build; cannot train on several GPUs "
                "(training.device=cpu trains with gloo)"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend,
            timeout=timeout(),
            device_id=device if device.type == "cuda" else None,
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


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: call it on all ranks)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor(int(flag), device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (unchanged without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def agree_on_startup(config: dict, error: BaseException | None) -> None:
    """Collective after setup: every rank raises if any rank failed or the configs differ.

    ``config`` is the resolved config (a plain dict); ``error`` what this rank's setup raised.
    Each rank sends a hash of its config and its error message (one ``all_gather_object``), so
    a rank that failed does not leave the others waiting in a later collective. A failing rank
    re-raises its own error; the others raise ``DistributedSetupError`` naming the failed rank.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    text = repr(sorted(_flatten(config).items()))
    digest = hashlib.sha256(text.encode()).hexdigest()
    message = None if error is None else (str(error).strip() or type(error).__name__)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (digest, message))
    failed = [(r, m) for r, (_, m) in enumerate(everyone) if m is not None]
    rank = dist.get_rank()
    if failed:
        if error is not None:
            if rank != 0 and isinstance(error, MuonGPTError):
                error.reported_by_rank0 = True  # rank 0 names this rank and its message
            raise error
        r, m = failed[0]
        others = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
        raise DistributedSetupError(f"rank {r} failed during setup{others}: {m}")
    digests = [d for d, _ in everyone]
    if len(set(digests)) > 1:
        configs: list = [None] * len(digests)
        dist.all_gather_object(configs, _flatten(config))
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        a, b = configs[0], configs[bad[0]]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = "; ".join(
            f"{k} (rank 0 {a.get(k)!r}, rank {bad[0]} {b.get(k)!r})" for k in keys[:3]
        )
        raise DistributedSetupError(
            f"ranks disagree on the config: rank(s) {bad} resolved a different config than "
            f"rank 0: {shown}; launch every rank with the same overrides and config files"
        )


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank's weights rank 0's (they are equal already when seeds are equal; this
    guarantees it, e.g. after a resume that read a file each node has its own copy of)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in model.parameters():
            if hasattr(p, "to_local"):  # an FSDP shard: each rank holds other rows
                continue
            dist.broadcast(p.data, src=0)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group, unless a failed collective may have left others in flight.

    Called from ``finally`` blocks: with a non-muongpt exception propagating (a collective
    that timed out or lost a peer), destroying the group under the async collectives still
    queued aborts the process (SIGABRT) before the error is printed; process exit frees it.
    """
    if not (ctx.enabled and dist.is_initialized()):
        return
    failing = sys.exc_info()[1]
    if failing is not None and not isinstance(failing, MuonGPTError):
        return
    dist.destroy_process_group()
