"""The benchmarks' two clocks: CUDA events around one call, and wall seconds per training step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def cuda_median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls, each between two CUDA events (the GPU's
    time for it, launches overlapped), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(True), torch.cuda.Event(True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def seconds_per_step(
    step: Callable[[], None], steps: int, device: torch.device, distributed: bool
) -> float:
    """Wall seconds per ``step`` over ``steps`` steps, the device drained before and after; under
    torch.distributed the ranks start together and the slowest rank's figure is returned."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = torch.tensor((time.perf_counter() - start) / steps, device=device)
    if distributed:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)
