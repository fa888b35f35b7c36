"""The three ways a job ends early, and the one place that turns each into a line and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Bad input from the user (a path, a file, a setting): the message names the problem and the fix."""


class RunFailed(Exception):
    """A run that started and then failed (its workers failed past `scaling.max_failures`): the message
    names the run and the cause; the MLflow run is already marked FAILED."""


class RunStopped(Exception):
    """Ctrl-C stopped a run or a study: the message names it, how far it got and the command that goes on
    with it; its MLflow run is already marked KILLED."""


def cli_errors(main: F) -> F:
    """Run a job's `main`, printing a `UserError` (exit 2) or a `RunFailed` (exit 1) as one `error:` line on
    stderr, and a `RunStopped` (or a Ctrl-C before any run was open) as one `stopped:` line (exit 130, as a
    shell reports a Ctrl-C)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except RunFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        except RunStopped as err:
            print(f"stopped: {err}", file=sys.stderr)
            raise SystemExit(130) from None
        except KeyboardInterrupt:  # before a run or study was open: nothing to mark, nothing to resume
            print("stopped: Ctrl-C", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
