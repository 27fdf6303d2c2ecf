"""The CLI: every command has --help, and user errors become one clear line with exit code 1."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from lutq.cli import app


def _all_commands(cmd: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if hasattr(cmd, "commands"):  # typer vendors its own click: duck-type the group
        for name, sub in cmd.commands.items():
            out += _all_commands(sub, (*prefix, name))
    return out


@pytest.mark.parametrize("path", _all_commands(get_command(app)), ids=lambda p: " ".join(p) or "lutq")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_all_stages_registered() -> None:
    names = {p[0] for p in _all_commands(get_command(app)) if p}
    assert {
        "assets",
        "cache",
        "quantize",
        "convert",
        "snap",
        "train",
        "plot",
        "eval",
        "chat",
        "export",
        "pretrain",
        "data",
        "bench",
        "speedrun",
        "store",
        "pull",
    } <= names


def test_error_is_one_line_exit_1(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "lutq.cli", "assets", "fetch", "no-such-asset"], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "unknown asset 'no-such-asset'" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_starts_without_torch() -> None:
    """Every stage's commands import without torch / transformers (lazy package exports, lutq.core.lazy), so
    `lutq --help` and argument errors answer in about a second; the exports still resolve on first use."""
    import subprocess
    import sys

    code = (
        "import sys, lutq.cli; heavy = sorted({'torch', 'transformers'} & set(sys.modules)); "
        "assert not heavy, heavy; from lutq.evaluate.compare import load_text; "
        "from lutq.evaluate import compare, perplexity; assert callable(compare) and callable(perplexity); "
        "import lutq.kd; assert lutq.kd.KDCache.__name__ == 'KDCache'; "
        "assert lutq.kd.cache.__name__ == 'lutq.kd.cache'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_lutq_is_the_cli() -> None:
    import subprocess
    import sys

    from lutq import __version__

    out = subprocess.run([sys.executable, "-m", "lutq", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lutq {__version__}"
