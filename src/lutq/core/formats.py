"""One home for reading lutq's self-describing JSON headers (checkpoint config.json, KD cache meta.json,
token-file meta, ANE artefact config.json, run.json): parse, check format name and version, and say
exactly which file is wrong and how."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError


def read_json(path: str | Path, *, what: str = "file", missing_hint: str = "") -> Any:
    """Parse a JSON file; a missing file or invalid JSON is a LutqError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LutqError(f"{path.parent}: not a {what} (no {path.name}){missing_hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LutqError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); the file is corrupt") from e


def read_versioned_json(
    path: str | Path, *, format: str, max_version: int, what: str, missing_hint: str = ""
) -> dict[str, Any]:
    """Parse a JSON header and check its `format` name and integer `format_version` (1..max_version)."""
    path = Path(path)
    data = read_json(path, what=what, missing_hint=missing_hint)
    if not isinstance(data, dict) or data.get("format") != format:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LutqError(f"{path}: not a {what} (format={got!r}, expected {format!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise LutqError(f"{path}: missing or invalid format_version ({version!r})")
    if version > max_version:
        raise LutqError(f"{path}: format_version {version} is newer than this lutq reads ({max_version}); upgrade lutq")
    return data
