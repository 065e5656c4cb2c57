import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path

import pytest
import torch

# Tests are single-threaded by default: CI has 2 cores and runs processes of its own.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _interpret_scalars_with_numpy_2_4() -> None:
    """Triton's interpreter (3.6) turns a runtime scalar into a Python int with int() of a
    one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"):
    a kernel whose loop bound is a runtime value fails there. Read the element instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _interpreted_kernels() -> None:
    """Without a GPU, build every Triton kernel as an interpreted function (Triton reads
    TRITON_INTERPRET when a kernel is decorated), then unset the variable: the library runs its
    kernels on CPU tensors only where it is set, which ``kernel_marks.needs_interpreter`` does for
    the kernel tests alone, so the rest of the suite trains on the PyTorch paths as users do."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _interpret_scalars_with_numpy_2_4()  # imports Triton: its own jit functions too
        import muongpt.kernels

        for module in pkgutil.iter_modules(muongpt.kernels.__path__):
            importlib.import_module(f"muongpt.kernels.{module.name}")
    finally:
        del os.environ["TRITON_INTERPRET"]


if os.environ.get("TRITON_INTERPRET") == "1":  # set by hand: everything interpreted
    _interpret_scalars_with_numpy_2_4()
elif not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    _interpreted_kernels()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def single_thread():
    """Tiny matmuls: one thread avoids OpenMP hand-off stalls on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for one test: the library then runs its kernels on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
