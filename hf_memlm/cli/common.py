"""What every sub-command shares: how it reports a user error."""

from __future__ import annotations

import sys

USER_ERROR = 2  # the exit status of a command refused for bad input (argparse's own)


def fail(command: str, message: str) -> int:
    """Print `hf-memlm COMMAND: error: MESSAGE` to stderr; return the exit status to give back."""
    print(f"hf-memlm {command}: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR
