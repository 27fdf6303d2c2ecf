"""The run log: every speedrun appends one entry to `runs/log.jsonl` (machine-readable) and `runs/log.md`
(the seed's hand-written speedrun log, automated): date, recipe, machine, device, times, figures."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from lutq.core.atomic import atomic_write_text


def machine_info() -> dict[str, Any]:
    """Hostname, OS, CPU count and the compute device (CUDA name or CPU model)."""
    import torch

    from lutq.bench.timing import device_name

    return {
        "machine": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "torch": torch.__version__,
    }


def _append(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + text)


def append_log(log_dir: str | Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """Append `entry` to log_dir/log.jsonl and a readable section to log_dir/log.md; returns both paths."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    jsonl, md = log_dir / "log.jsonl", log_dir / "log.md"
    _append(jsonl, json.dumps(entry, default=str) + "\n")
    header = "" if md.exists() else "# Speedrun log\n\nOne section per `lutq speedrun`, appended automatically.\n"
    _append(md, header + markdown_entry(entry))
    return jsonl, md


def markdown_entry(e: dict[str, Any]) -> str:
    lines = [
        "",
        f"## {e['date']}: {e['recipe']} ({e['status']})",
        "",
        f"- machine: {e['machine']} ({e['os']}, {e['cpus']} CPUs); device: {e['device']}; torch {e['torch']}",
        f"- command: `{e['command']}`",
        f"- run dir: `{e['run_dir']}`; budget {e['budget_minutes']} min (scale ×{e['factor']:.2f}); "
        f"this invocation {e['elapsed_s'] / 60:.1f} min; all stages {e['stages_total_s'] / 60:.1f} min",
        "",
        "| stage | kind | status | minutes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['kind']} | {s['status']} | {s['total_s'] / 60:.1f} |" for s in e["stages"]]
    if e.get("table"):
        lines += ["", e["table"].rstrip()]
    if e.get("error"):
        lines += ["", f"error: {e['error']}"]
    return "\n".join(lines) + "\n"
