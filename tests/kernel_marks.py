"""Skip marks of the Triton kernel tests.

Without a GPU, ``conftest.py`` builds the kernels as Triton interpreter functions (with Triton
installed: the ``dev`` extra on Linux), and ``needs_interpreter`` sets ``TRITON_INTERPRET=1`` for
its test alone, so the library runs them on CPU tensors there and only there.
"""

from __future__ import annotations

import pytest
import torch

from muongpt.kernels import pom
from muongpt.kernels.triton_support import triton


def _interpreted() -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(pom._mix_fwd_kernel, InterpretedFunction)


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton is not None), reason="needs a CUDA GPU and Triton"
)
_skip_unless_interpreted = pytest.mark.skipif(
    not _interpreted(), reason="needs Triton, its kernels built for the interpreter (no GPU)"
)


def needs_interpreter(test):
    """Skip ``test`` unless the kernels are interpreted; run it with TRITON_INTERPRET=1 set
    (conftest.py's ``triton_interpreter`` fixture)."""
    return _skip_unless_interpreted(pytest.mark.usefixtures("triton_interpreter")(test))
