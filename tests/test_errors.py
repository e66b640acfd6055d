"""The CLI wrapper: user errors and Ctrl-C become one line and an exit status, never a traceback."""

from __future__ import annotations

import pytest

from pipeline.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, run_cli


def raising(error):
    def main(argv):
        raise error

    return main


@pytest.mark.parametrize(
    "main,status,message",
    [
        (raising(UserError("folder x does not exist; check the path.")), EXIT_USER_ERROR, "error: folder x"),
        (raising(KeyboardInterrupt()), EXIT_INTERRUPTED, "interrupted"),
        (lambda argv: None, 0, ""),
        (lambda argv: 3, 3, ""),
    ],
)
def test_run_cli_exit_status_and_message(main, status, message, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [])
    assert exited.value.code == status
    assert message in capsys.readouterr().err


def test_an_interruption_says_what_was_kept_only_when_something_was(capsys):
    from pipeline.errors import Interrupted

    for error, said in ((KeyboardInterrupt(), "interrupted.\n"),
                        (Interrupted("the 3 images done so far are kept in s.h5.shards"),
                         "interrupted: the 3 images done so far are kept in s.h5.shards; "
                         "run the same command again to go on.\n")):
        with pytest.raises(SystemExit):
            run_cli(raising(error), [])
        assert capsys.readouterr().err == said


def test_under_make_errors_name_the_make_variables(capsys, monkeypatch):
    import argparse

    from pipeline.errors import MAKE_NAMES

    monkeypatch.setenv(MAKE_NAMES, "--cache=CACHE --precision=PRECISION")
    monkeypatch.setattr(argparse.ArgumentParser, "error", argparse.ArgumentParser.error)  # restored after the test
    with pytest.raises(SystemExit) as exited:
        run_cli(raising(UserError("x.h5 holds other images; use another --cache, or --precision int8.")), [])
    assert exited.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: x.h5 holds other images; use another CACHE, or PRECISION=int8.\n"

    def parse(argv):
        parser = argparse.ArgumentParser(prog="stage")
        parser.add_argument("--precision", choices=["fp32"])
        parser.parse_args(argv)

    with pytest.raises(SystemExit) as exited:
        run_cli(parse, ["--precision", "int4"])
    assert exited.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: argument PRECISION: invalid choice: 'int4'")
