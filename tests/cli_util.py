"""Running the `difusion` command inside a test."""

import sys

from difusion.cli import main


def cli(monkeypatch, capsys, *args):
    """(exit status, stdout, stderr) of `difusion ARGS`."""
    monkeypatch.setattr(sys, "argv", ["difusion", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
