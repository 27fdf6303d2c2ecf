"""`speedrun(cfg)`: run a recipe's stages (skipping what is done, resuming what was interrupted), print the
comparison table, and append the run to the run log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lutq.core.configs import ConfigBase
from lutq.core.console import console
from lutq.speedrun.log import append_log, machine_info
from lutq.speedrun.recipe import Recipe, load_recipe
from lutq.speedrun.runner import StageResult, check_selection, run_stages


@dataclass
class SpeedrunConfig(ConfigBase):
    """Which recipe, how much time, where. `run_dir` default: runs/speedrun-RECIPE; `log_dir`: its parent."""

    recipe: str = "default"
    budget: float | None = None  # minutes; scales the recipe's step / sequence counts
    run_dir: Path | None = None
    log_dir: Path | None = None
    force: tuple[str, ...] = ()  # stages to re-run from scratch
    overrides: tuple[str, ...] = ()  # STAGE.KEY=VALUE stage-param overrides (recipe.with_overrides)
    stop_after: str | None = None
    log: bool = True


@dataclass
class SpeedrunResult:
    recipe: Recipe
    run_dir: Path
    stages: list[StageResult]
    elapsed_s: float
    table: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    log_files: tuple[Path, ...] = ()


def speedrun(cfg: SpeedrunConfig) -> SpeedrunResult:
    """Run the recipe under `run_dir`; on success (and on failure, marked as such) append to the run log."""
    import lutq.speedrun.stages  # noqa: F401  (registers the built-in stage kinds)

    recipe = load_recipe(cfg.recipe, cfg.overrides)
    check_selection(recipe.stages, cfg.force, cfg.stop_after)  # before the run: a typo is not a logged run
    factor = recipe.factor(cfg.budget)
    run_dir = Path(cfg.run_dir or Path("runs") / f"speedrun-{recipe.name}")
    log_dir = Path(cfg.log_dir or run_dir.parent)
    console.print(f"speedrun {recipe.name}: {recipe.description}".rstrip(": "))
    console.print(
        f"  {len(recipe.stages)} stages, sized for {recipe.budget_minutes:g} min"
        + (f", scaled ×{factor:.2f} for --budget {cfg.budget:g}" if factor != 1.0 else "")
        + f"; run dir {run_dir}"
    )
    t0 = time.perf_counter()
    results: list[StageResult] = []
    partial: dict[str, StageResult] = {}
    error = None
    try:
        results = run_stages(
            recipe.stages, run_dir, factor=factor, force=cfg.force, stop_after=cfg.stop_after, results=partial
        )
    except BaseException as e:
        error = e
        results = list(partial.values())  # what this run got through (done markers may be an older run's)
        raise
    finally:
        elapsed = time.perf_counter() - t0
        report = next((r for r in results if r.name == recipe.report), None)
        table = str(report.summary.get("table", "")) if report else ""
        rows = list(report.summary.get("rows", [])) if report else []
        files: tuple[Path, ...] = ()
        if cfg.log:
            entry = _log_entry(cfg, recipe, run_dir, factor, results, elapsed, table, rows, error)
            files = append_log(log_dir, entry)
    if table:
        console.print(table)
    console.print(
        f"speedrun {recipe.name}: done in {elapsed / 60:.1f} min; all stages "
        f"{sum(r.total_s for r in results) / 60:.1f} min" + (f"; logged to {files[1]}" if files else "")
    )
    return SpeedrunResult(recipe, run_dir, results, elapsed, table, rows, files)


def _log_entry(
    cfg: SpeedrunConfig,
    recipe: Recipe,
    run_dir: Path,
    factor: float,
    results: list[StageResult],
    elapsed: float,
    table: str,
    rows: list[dict[str, Any]],
    error: BaseException | None,
) -> dict[str, Any]:
    status = (
        "complete"
        if error is None and cfg.stop_after is None
        else ("stopped" if error is None else f"failed ({type(error).__name__})")
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "overrides": recipe.meta.get("overrides", []),  # what with_overrides applied
        "status": status,
        **machine_info(),
        "command": " ".join(["lutq", *sys.argv[1:]]) if _from_cli() else "speedrun()",
        "run_dir": str(run_dir),
        "budget_minutes": cfg.budget if cfg.budget is not None else recipe.budget_minutes,
        "factor": factor,
        "elapsed_s": elapsed,
        "stages_total_s": sum(r.total_s for r in results),
        "stages": [
            {"name": r.name, "kind": r.kind, "status": r.status, "elapsed_s": r.elapsed_s, "total_s": r.total_s}
            for r in results
        ],
        "table": table,
        "figures": rows,
        "error": None if error is None else str(error)[:500],
    }


def _from_cli() -> bool:
    """Run by the `lutq` command (or `python -m lutq.cli`), so sys.argv is the command line to log."""
    prog = Path(sys.argv[0])
    return prog.name == "lutq" or prog.parts[-2:] == ("lutq", "cli.py")
