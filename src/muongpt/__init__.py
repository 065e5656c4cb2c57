"""muongpt: GPT training at speedrun speed, as a configurable library."""

__version__ = "0.2.0"


class MuonGPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class DiskFullError(MuonGPTError):
    """A write failed because the file system is full."""


def disk_full(error: BaseException, path) -> DiskFullError | None:
    """``error`` as a one-line DiskFullError naming ``path`` if it means "no space left", else None.

    Besides OSError(ENOSPC), torch.save reports a full disk as a RuntimeError from its zip writer
    ("[enforce fail at inline_container.cc:...] . unexpected pos ..." or "file write failed").
    """
    import errno

    if isinstance(error, DiskFullError):
        return error
    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(error, RuntimeError)
        and ("unexpected pos" in text or "file write failed" in text or "No space left" in text)
    )
    if not full:
        return None
    return DiskFullError(f"{path}: no space left on device; free some space and rerun")
