"""`shipyard` run in the test's own process (capsys sees its output, monkeypatch its client)."""

from __future__ import annotations

import sys

import pytest

from shipyard import cli


def shipyard(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``shipyard ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["shipyard", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err
