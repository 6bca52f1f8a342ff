"""User errors: one clear line, exit code 2, no traceback.

Anything that is the user's to fix (a missing path, a bad flag combination, corrupt input) raises
`UserError`. Programming errors raise anything else and keep their traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message names the thing and what to do."""


def first_line(e: BaseException) -> str:
    """An exception's first line, for a one-line message (its type when it says nothing)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a script's `main(argv=None)` so that a `UserError` prints one line and returns 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR

    return wrapper
