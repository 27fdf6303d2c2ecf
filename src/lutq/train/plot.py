"""Loss curves of one or several runs (train and validation loss against optimizer step) as a PNG.

The loss is the run's whole training objective: the top-K KD term plus any extra terms it was given
(label CE, full-vocabulary KL); `train.jsonl` also holds each term on its own."""

from __future__ import annotations

import io
from pathlib import Path

from lutq.core.atomic import atomic_write_bytes
from lutq.core.errors import LutqError
from lutq.core.labels import distinct_labels
from lutq.train.run_dir import RunDir


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(
    runs: list[str | Path], out: str | Path, *, train_key: str = "loss", eval_key: str = "eval_loss", logy: bool = False
) -> Path:
    """Draw train (thin) and eval (markers) loss of each run into one PNG at `out`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise LutqError("plot: give at least one run directory")
    for run in runs:
        if not RunDir(run).jsonl.is_file():
            raise LutqError(f"{RunDir(run).jsonl}: missing; is {run} a lutq train run directory?")
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = 0
    for i, (run, name) in enumerate(zip(runs, distinct_labels([Path(r).resolve() for r in runs]), strict=True)):
        rows = RunDir(run).rows()
        color = f"C{i % 10}"
        steps, vals = _series(rows, train_key)
        if steps:
            ax.plot(steps, vals, color=color, alpha=0.6, lw=1, label=f"{name} train")
            drawn += 1
        steps, vals = _series(rows, eval_key)
        if steps:
            ax.plot(steps, vals, color=color, marker="o", lw=2, label=f"{name} val")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise LutqError(f"plot: no {train_key!r} or {eval_key!r} values in {', '.join(map(str, runs))}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (KD + the run's extra terms)" if train_key == "loss" else train_key)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())
