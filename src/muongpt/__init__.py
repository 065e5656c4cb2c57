"""muongpt: GPT training at speedrun speed, as a configurable library."""

__version__ = "0.2.0"


class MuonGPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
