"""Short, distinct labels for things named by paths (compare rows, plot legends)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def distinct_labels(specs: Sequence[str | Path]) -> list[str]:
    """One distinct label per spec: its last path component, grown to as many trailing components as it takes
    to tell the specs apart (runs/q4a4/best and runs/q2a4/best become q4a4/best and q2a4/best, not two "best");
    a spec given twice is numbered ("best (2)"). Resolve paths first to label `.` by its directory's name."""
    parts = [Path(s).parts[1 if Path(s).anchor else 0 :] or (str(s),) for s in specs]  # no '/' in a label
    depth = [1] * len(specs)

    def label(i: int) -> str:
        return "/".join(parts[i][-depth[i] :]) or str(specs[i])

    while True:
        by_label: dict[str, list[int]] = {}
        for i in range(len(specs)):
            by_label.setdefault(label(i), []).append(i)
        grow = [i for same in by_label.values() if len(same) > 1 for i in same if depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out: list[str] = []
    for i in range(len(specs)):
        name, n = label(i), 1
        while name in out:
            n += 1
            name = f"{label(i)} ({n})"
        out.append(name)
    return out
