"""Printing bench results as a rich table and writing them as JSON (with device, command, date)."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lutq import __version__
from lutq.bench.timing import StepStats
from lutq.core.atomic import atomic_write_json
from lutq.core.console import console


def environment(device: Any) -> dict[str, Any]:
    """Who measured what where: date, machine, device name, library versions, the command line."""
    import torch

    from lutq.bench.timing import device_name

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["lutq", *sys.argv[1:]]) if Path(sys.argv[0]).name == "lutq" else " ".join(sys.argv),
        "machine": platform.node(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lutq": __version__,
        "python": platform.python_version(),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_stats(title: str, rows: list[StepStats]) -> None:
    """One table row per measured configuration."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("config", "batch", "L", "step s", "tokens/s", "peak MB", "MFU", "loss"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(
            r.label,
            str(r.batch),
            str(r.seq_len),
            f"{r.step_s:.4f}",
            f"{r.tokens_per_s:,.0f}",
            _fmt(r.peak_mem_mb, ",.0f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            _fmt(r.loss, ".3f"),
        )
    console.print(table)


def print_dict(title: str, d: dict[str, Any]) -> None:
    """A two-column table of a flat result dict (floats with 4 significant digits)."""
    from rich.table import Table

    table = Table("metric", "value", title=title)
    for k, v in d.items():
        table.add_row(k, f"{v:,.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def write_json(path: str | Path, kind: str, device: Any, config: dict[str, Any], results: Any) -> Path:
    """Write {"bench": kind, environment..., "config": ..., "results": ...} atomically."""
    return atomic_write_json(path, {"bench": kind, **environment(device), "config": config, "results": results})
