"""muongpt: GPT training at speedrun speed, as a configurable library."""

from contextlib import contextmanager

__version__ = "0.2.0"


class MuonGPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class DiskFullError(MuonGPTError):
    """A write failed because the file system is full."""


def error_line(error: BaseException, limit: int = 160) -> str:
    """``error`` told inside another one-line message: ``Type: the first line of its message``
    (terminal colour codes removed), cut to about ``limit`` characters at a word boundary."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        cut = first[:limit].rsplit(" ", 1)[0] if " " in first[:limit] else first[:limit]
        first = cut.rstrip(" ,;:") + " ..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def disk_full(error: BaseException, path) -> DiskFullError | None:
    """``error`` as a one-line DiskFullError naming ``path`` if it means "no space left", else None.

    Besides OSError(ENOSPC), torch.save reports a full disk as a RuntimeError from its zip writer
    ("[enforce fail at inline_container.cc:...] . unexpected pos ..." or "file write failed"), and
    torch.distributed.checkpoint as a CheckpointException (a BaseException) holding each failed
    rank's error.
    """
    import errno

    if isinstance(error, DiskFullError):
        return error
    if type(error).__name__ == "CheckpointException":
        ranks = getattr(error, "failures", {}).values()
        return next((f for f in (disk_full(e, path) for e, _ in ranks) if f is not None), None)
    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(error, RuntimeError)
        and ("unexpected pos" in text or "file write failed" in text or "No space left" in text)
    )
    if not full:
        return None
    return DiskFullError(f"{path}: no space left on device; free some space and rerun")


@contextmanager
def full_disk_named(path):
    """Around a write: "no space left" (as ``disk_full`` recognises it) leaves as one
    DiskFullError naming ``path``; every other error passes through unchanged."""
    try:
        yield
    except BaseException as e:  # torch.distributed.checkpoint's errors are BaseExceptions
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from None


def atomic_write(path, write):
    """Call ``write(temporary_path)``, fsync it, rename it to ``path``: all or nothing. A full
    disk is a one-line DiskFullError naming ``path``; the temporary file never stays behind."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with full_disk_named(path):
            write(tmp)
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(folder) -> None:
    # Make the rename itself durable (POSIX); not every platform can open a folder.
    import os

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
