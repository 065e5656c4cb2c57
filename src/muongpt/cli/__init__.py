"""Command-line entry points; each sub-command lives in its own module with a main(argv)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from muongpt import MuonGPTError, atomic_write


def report_errors(command: Callable[[], object]) -> int:
    """Run a command; a user-facing error becomes one line on stderr and exit code 2.

    The command's result is the exit code when it is an int, else 0.
    """
    try:
        result = command()
    except MuonGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _why_not(path: Path, error: OSError) -> str:
    """The reason a folder cannot be made: the regular file in its way, or the OS's words."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder"
    return error.strerror or type(error).__name__


def make_dirs(path: str | Path, what: str) -> Path:
    """``mkdir -p path``; failure is a one-line MuonGPTError that names ``what`` and the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MuonGPTError(f"{what}: cannot create folder {path} ({_why_not(path, e)})") from None
    return path


def probe_dir(path: str | Path, what: str) -> None:
    """Check that folder ``path`` exists or can be created and written, leaving nothing behind.

    Folders it had to create for the check are removed again, innermost first.
    """
    path = Path(path).absolute()
    missing = [p for p in [path, *path.parents] if not p.exists()]
    make_dirs(path, what)
    try:
        if not os.access(path, os.W_OK | os.X_OK):
            raise MuonGPTError(f"{what}: cannot write into folder {path} (permission denied)")
        probe = path / f".muongpt-probe-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise MuonGPTError(f"{what}: cannot write into folder {path} ({e.strerror})") from None
    finally:
        for p in missing:  # innermost first
            try:
                p.rmdir()
            except OSError:
                break


def probe_file(path: str | Path, what: str) -> Path:
    """Check, before any work, that file ``path`` can be written: not a folder, in a folder that
    exists or can be made and written (``probe_dir``). Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise MuonGPTError(f"{what}: {path} is a folder; give a file name")
    probe_dir(path.absolute().parent, what)
    return path


def write_text(path: str | Path, text: str, what: str) -> Path:
    """Write a text file (its folder made first) atomically: a failure part-way leaves the file
    as it was, and a reader never sees it half-written; failure is one line naming the path."""
    path = Path(path)
    make_dirs(path.parent, what)
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise MuonGPTError(
            f"{what}: cannot write {path} ({e.strerror or type(e).__name__})"
        ) from None
    return path
