"""The shared rich console and a progress-bar factory for anything long."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress(*extra_columns: TextColumn, transient: bool = False) -> Progress:
    """A rich Progress with bar, count, elapsed and ETA; add e.g. a tokens/s column via extra_columns.

    Use as `with progress() as p: task = p.add_task("caching", total=n); p.advance(task)`.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def setup_logging(level: str = "INFO") -> None:
    """Route `logging` through rich (called once by the CLI)."""
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="[%X]", handlers=[RichHandler(console=console)], force=True
    )
