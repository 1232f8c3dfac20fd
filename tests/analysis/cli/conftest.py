"""The CLI tests' runner: `run_cli(*argv)` -> (exit status, stdout, stderr), in-process."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from analysis.cli import main


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    def run(*argv: object) -> tuple[int, str, str]:
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run
