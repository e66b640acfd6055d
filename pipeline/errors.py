"""User-facing errors: one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
MAKE_NAMES = "PIPELINE_MAKE_NAMES"  # "--option=VARIABLE ...", set by the Makefile: errors then name what was typed


def command(stage: str) -> str:
    """How to run ``stage`` as typed in this shell, without activating anything: the ``transfer`` script beside
    this interpreter (``.venv/bin/transfer STAGE`` from the project folder), else this interpreter's ``-m``."""
    script = Path(sys.executable).parent / "transfer"
    if not script.exists():
        return f"{sys.executable} -m pipeline.{stage}"
    relative = os.path.relpath(script)
    return f"{relative if not relative.startswith('..') else script} {stage}"


def counted(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural unless one: ``1 image``, ``3 shards``."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


class UserError(Exception):
    """A problem the user can fix (a missing file, a wrong option, no network); the message says how."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, and what of the work done so far was kept (``kept``, a phrase: "the 120 images done so far are
    kept in features/embeddings.h5.shards"); a stage raises it instead of a plain KeyboardInterrupt when it kept
    something."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept


class _Lines(logging.Formatter):
    """The package's messages on the command line: warnings as ``warning: ...``, everything else as it is."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def show_messages() -> None:
    """Send the package's log messages (notices at INFO, warnings) to stderr, one plain line each: what the
    command line does; a program that imports the package configures logging as it likes instead."""
    logger = logging.getLogger("pipeline")
    if not any(isinstance(handler.formatter, _Lines) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Lines())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
    show_messages()
    names = _make_names(list(sys.argv[1:] if argv is None else argv))
    if names:  # under make, a bad option is one line in the make variable's name, like every other error
        argparse.ArgumentParser.error = _raise_user_error  # type: ignore[method-assign]
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {_in_make_terms(str(error), names)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (PermissionError, IsADirectoryError, NotADirectoryError) as error:
        print(f"error: cannot use {error.filename}: {error.strerror}; check the path and its permissions.",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as interruption:
        kept = getattr(interruption, "kept", "")
        print(f"interrupted: {kept}; run the same command again to go on." if kept else "interrupted.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)


def _one_line(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> str:
    """Warnings on the command line read like the errors: one line, no source excerpt."""
    return f"warning: {message}\n"


def _make_names(argv: Sequence[str]) -> dict[str, str]:
    """Option (or, as ``@1``, the first argument's value) to make variable, from what the Makefile exported."""
    pairs = (item.partition("=") for item in os.environ.get(MAKE_NAMES, "").split())
    names = {option: variable for option, _, variable in pairs if option.startswith(("--", "@")) and variable}
    first = names.pop("@1", None)
    if first and argv and not argv[0].startswith("-"):
        names[argv[0]] = first
    return names


def _in_make_terms(message: str, names: dict[str, str]) -> str:
    """``message`` with each option a make variable sets named as that variable (``--cache x`` as ``CACHE=x``), and
    the first argument's value as its variable's (``no images found in DATA=x``)."""
    for option, variable in names.items():
        if not option.startswith("--"):
            message = re.sub(rf"(?<![\w/=.-]){re.escape(option)}(?![\w/.-])", f"{variable}={option}", message, count=1)
            continue
        message = re.sub(rf"{re.escape(option)} (?!or\b|and\b)([^\s,;]+)", rf"{variable}=\1", message)
        message = re.sub(rf"{re.escape(option)}\b(?!-)", variable, message)
    return message


def _raise_user_error(parser: argparse.ArgumentParser, message: str) -> None:
    raise UserError(f"{message} (see {command(parser.prog.rsplit('pipeline.', 1)[-1])} --help).")
