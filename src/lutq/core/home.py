"""Where lutq keeps fetched assets and converted models: $LUTQ_HOME, default ~/.cache/lutq."""

from __future__ import annotations

import os
from pathlib import Path


def lutq_home() -> Path:
    """Return the lutq cache directory (created on demand)."""
    home = Path(os.environ.get("LUTQ_HOME") or Path.home() / ".cache" / "lutq").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
