"""What a resume of a KD-QAT run may change and what it may not, and what it reads back from the run directory.

A resume continues from `last/` (weights, optimizer, scheduler, RNG, counters). It may change the schedule
(`--steps` longer, `--lr`, `--warmup`, `--min-lr-ratio`), the loss weights, cadences, device and precision; it
refuses what would make it another run: how the student was built, what trains, the data stream and the cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError
from lutq.kd import KDCache
from lutq.train.config import TrainConfig
from lutq.train.run_dir import RunDir

# What a resume cannot change: how the student was built and what trains (the weights and the optimizer state
# come from last/), and the data stream (the batch of step s is fixed by the seed and the batch shape).
RESUME_FIXED = (
    "init",
    "model",
    "preset",
    "init_lut",
    "init_tighten",
    "init_calib_sequences",
    "mode",
    "train_lut",
    "latent",
    "batch_size",
    "grad_accum",
    "seed",
)
CACHE_IDENTITY = ("teacher", "L", "K", "R", "source", "train_sequences")


def check_resume_config(cfg: TrainConfig, run: RunDir, cache: KDCache) -> None:
    """Refuse a resume whose config changes what cannot change (RESUME_FIXED) or trains on another cache."""
    saved_dict = run.resume_config()  # the config the checkpoint was saved under (run.json's for older runs)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig.from_dict({k: v for k, v in saved_dict.items() if k in known}, source=str(run.path))
    fix = f"start a new run from its weights instead: --init {run.last} --out ANOTHER_DIR"
    for name in RESUME_FIXED:
        old, new = getattr(saved, name), getattr(cfg, name)
        if old != new and not same_path(old, new):
            raise LutqError(f"{run.path}: cannot resume with {name} changed ({old!r} -> {new!r}); {fix}")
    recorded = run.read_config().get("cache_meta", {})
    current = cache_identity(cache)
    for key in CACHE_IDENTITY:
        if key in recorded and key in current and recorded[key] != current[key]:
            raise LutqError(
                f"{run.path}: cannot resume on KD cache {cache.path}: its {key} is {current[key]!r}, the run's "
                f"cache had {recorded[key]!r}; {fix}"
            )


def same_path(old: Any, new: Any) -> bool:
    """Whether two spellings of --init / --model name the same thing: the same file or directory (a relative and
    an absolute path, another working directory), or an old path that is gone (the run was moved with its
    inputs; on resume the weights come from last/, so what --init was matters no more)."""
    if not (isinstance(old, str | Path) and isinstance(new, str | Path)) or not Path(new).exists():
        return False
    return not Path(old).exists() or Path(old).resolve() == Path(new).resolve()


def cache_identity(cache: KDCache) -> dict[str, Any]:
    meta = {k: cache.meta.get(k) for k in CACHE_IDENTITY if k in cache.meta}
    return {**meta, "train_sequences": cache.num_sequences("train")}


def best_on_disk(run: RunDir) -> dict[str, Any] | None:
    """{"eval_loss", "step"} of the run's best/ checkpoint, from its config.json (None without a readable one)."""
    try:
        info = json.loads((run.best / "config.json").read_text())["extra"]["train"]
        return {"eval_loss": float(info["metrics"]["eval_loss"]), "step": int(info["step"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evals_from_log(run: RunDir) -> tuple[dict[str, float], dict[str, float]]:
    """(eval metrics at step 0, latest eval metrics) from train.jsonl, for a resumed run's summary."""
    rows = run.rows()
    evals = [e for r in rows if (e := {k: v for k, v in r.items() if k.startswith("eval_")})]
    rows0 = [r for r in rows if r.get("step") == 0]
    initial = {k: v for k, v in rows0[0].items() if k.startswith("eval_")} if rows0 else {}
    return initial, (evals[-1] if evals else {})


def latest_eval_step(run: RunDir) -> int | None:
    """The step of the latest evaluation in train.jsonl (None before the first)."""
    steps = [r["step"] for r in run.rows() if any(k.startswith("eval_") for k in r)]
    return steps[-1] if steps else None


def check_run_dir(run: RunDir, *, resume: bool, overwrite: bool) -> None:
    """A resume needs a run; a fresh start must not silently replace one."""
    if resume and not run.exists():
        raise LutqError(f"{run.path}: nothing to resume (no run.json)")
    if resume and overwrite:
        raise LutqError(f"{run.path}: --resume continues a run, --overwrite starts it over; pass one of them")
    if not resume and run.exists() and not overwrite:
        raise LutqError(
            f"{run.path}: a run already exists; continue it with --resume {run.path}, "
            "or pass --overwrite / another --out"
        )
