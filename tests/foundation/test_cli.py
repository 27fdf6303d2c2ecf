"""The CLI: every command has --help, and user errors become one clear line with exit code 1."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from lutq.cli import app


def _all_commands(cmd: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += _all_commands(sub, (*prefix, name))
    return out


@pytest.mark.parametrize("path", _all_commands(get_command(app)), ids=lambda p: " ".join(p) or "lutq")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_error_is_one_line_exit_1(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "lutq.cli", "assets", "fetch", "no-such-asset"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "unknown asset 'no-such-asset'" in res.stderr
    assert "Traceback" not in res.stderr
