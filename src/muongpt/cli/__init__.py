"""Command-line entry points; each sub-command lives in its own module with a main(argv)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from muongpt import MuonGPTError


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
