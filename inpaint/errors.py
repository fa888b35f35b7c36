"""One kind of error for bad user input, and the one place that turns it into a line and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Bad input from the user (a path, a file, a setting): the message names the problem and the fix."""


def cli_errors(main: F) -> F:
    """Run a job's `main`, printing a `UserError` as one `error:` line on stderr and exiting with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
