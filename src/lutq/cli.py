"""The `lutq` command line: thin typer wrappers that parse, call the library, print.

Each stage package contributes its commands through `lutq.<stage>.commands.register(app)`; heavy
imports (torch, transformers) happen inside the commands, so `lutq --help` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer
from rich.markup import escape

from lutq import __version__
from lutq.core.console import console, setup_logging
from lutq.core.errors import LutqError

app = typer.Typer(
    name="lutq",
    help="2-bit / 4-bit LUT quantization-aware training with KD, ANE export, and one-GPU pretraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Stage packages that provide commands (in `--help` order). Each has commands.py with register(app).
STAGES = (
    "assets",
    "data",
    "kd",
    "quant",
    "train",
    "evaluate",
    "export",
    "pretrain",
    "bench",
    "speedrun",
    "store",
)


def _version(value: bool) -> None:
    if value:
        print(f"lutq {__version__}")
        raise typer.Exit()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(LOG_LEVELS)} (any case)")
    return level


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    log_level: str = typer.Option(
        "WARNING",
        "--log-level",
        callback=_log_level,
        help="Python logging level: " + ", ".join(LOG_LEVELS) + " (any case).",
    ),
) -> None:
    setup_logging(log_level)


def _register_stages() -> None:
    for stage in STAGES:
        module = f"lutq.{stage}.commands"
        if importlib.util.find_spec(f"lutq.{stage}") is None or importlib.util.find_spec(module) is None:
            continue  # stage not installed in this build
        importlib.import_module(module).register(app)


_register_stages()


def main() -> None:
    """Entry point: run the app; LutqError becomes a one-line message and exit code 1."""
    try:
        app()
    except LutqError as e:
        # verbatim and on one line: no rich markup or emoji codes read from it ("[b]" in a path, "ckpt:x:"), no
        # wrapping at the terminal width (a piped stderr is 80 columns)
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, emoji=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
