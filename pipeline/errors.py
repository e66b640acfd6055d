"""User-facing errors: one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix (a missing file, a wrong option, no network); the message says how."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main`` and turn :class:`UserError` and Ctrl-C into a message and an exit status.

    Parameters
    ----------
    main : callable
        The stage's entry point; it takes ``argv`` and returns an exit status (``None`` means 0).
    argv : sequence of str, optional
        Command-line arguments; ``sys.argv[1:]`` when omitted.
    """
    warnings.formatwarning = _one_line
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (PermissionError, IsADirectoryError, NotADirectoryError) as error:
        print(f"error: cannot use {error.filename}: {error.strerror}; check the path and its permissions.", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to go on.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)


def _one_line(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> str:
    """Warnings on the command line read like the errors: one line, no source excerpt."""
    return f"warning: {message}\n"
