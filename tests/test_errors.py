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
