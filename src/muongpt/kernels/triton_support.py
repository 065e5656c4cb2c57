"""Triton where the installation has it (CUDA builds of PyTorch ship it; CPU builds may not).

Each kernel module imports ``triton``, ``tl`` and ``TensorDescriptor`` from here and defines its
kernels under ``if triton is not None:``; without Triton the plain PyTorch modules stay.
"""

import os
from functools import cache

from muongpt import error_line

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton, or none
    TensorDescriptor = None


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t) -> bool:
    """Triton present, and ``t`` on a CUDA device (or on the CPU under the interpreter)."""
    return triton is not None and (t.is_cuda or (interpreting() and t.device.type == "cpu"))


def failure_reason(error: Exception) -> str:
    """A kernel's build or launch error in one line, for the warning of its PyTorch fallback."""
    return error_line(error, limit=200)


@cache
def sm_count(index: int) -> int:
    """The number of streaming multiprocessors of CUDA device ``index`` (persistent kernels
    launch one program per SM)."""
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = [
    "TensorDescriptor",
    "failure_reason",
    "interpreting",
    "sm_count",
    "tl",
    "triton",
    "triton_runs_on",
]
