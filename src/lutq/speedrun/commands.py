"""`lutq speedrun [RECIPE]`: the whole pipeline in one command, resumable, logged."""

from __future__ import annotations

from pathlib import Path

import typer

from lutq.core.console import console


def speedrun_command(
    recipe: str = typer.Argument("default", help="Built-in recipe (default, q2a4-progressive, q4a4) or a TOML file."),
    budget: float = typer.Option(
        None,
        "--budget",
        help="Minutes to aim for; scales the recipe's steps and "
        "sequence counts (the recipe states what its counts are sized for).",
    ),
    run_dir: Path = typer.Option(
        None,
        "--run-dir",
        help="Where stages write (default: runs/speedrun-RECIPE). "
        "Re-running with the same dir skips finished stages and resumes the rest.",
    ),
    log_dir: Path = typer.Option(
        None, "--log-dir", help="Where log.md / log.jsonl are appended (default: the run dir's parent, i.e. runs/)."
    ),
    force: list[str] = typer.Option([], "--force", help="Re-run this stage from scratch (repeatable)."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Change a stage param: STAGE.KEY=VALUE, VALUE in TOML "
        "(e.g. q4a4_init.preset=q4a4_r32, q4a4.steps=400, q2a4.kd.full_kl_weight=0.5;"
        " repeatable). Changed stages re-run, and later stages using their output.",
    ),
    stop_after: str = typer.Option(None, "--stop-after", help="Stop after this stage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages and their params, run nothing."),
    list_recipes: bool = typer.Option(False, "--list", help="List the built-in recipes and stage kinds."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not append to the run log."),
) -> None:
    """Run a recipe's stages (cache -> quantize -> train -> convert -> train -> snap -> export -> eval), skipping
    finished ones and resuming an interrupted one; print the comparison table; append to runs/log.md."""
    from rich.markup import escape

    import lutq.speedrun.stages  # noqa: F401  (registers the stage kinds)
    from lutq.speedrun.recipe import builtin_recipes, load_recipe
    from lutq.speedrun.runner import KINDS, stage_params
    from lutq.speedrun.speedrun import SpeedrunConfig, speedrun

    if list_recipes:
        for name, path in sorted(builtin_recipes().items()):
            r = load_recipe(path)
            console.print(f"[bold]{name}[/] ({r.budget_minutes:g} min): {r.description}")
        console.print("stage kinds: " + ", ".join(f"{k} ({v.description})" for k, v in sorted(KINDS.items())))
        return
    if dry_run:
        r = load_recipe(recipe, overrides)
        factor = r.factor(budget)
        console.print(escape(f"{r.name}: {r.description} (sized for {r.budget_minutes:g} min, scale ×{factor:.2f})"))
        for s in r.stages:  # the params the run would use (plugin kinds too), escaped from rich markup
            console.print(escape(f"  {s.name} [{s.kind}]: {stage_params(s, factor)}"))
        return
    speedrun(
        SpeedrunConfig(
            recipe=recipe,
            budget=budget,
            run_dir=run_dir,
            log_dir=log_dir,
            force=tuple(force),
            overrides=tuple(overrides),
            stop_after=stop_after,
            log=not no_log,
        )
    )


def register(app: typer.Typer) -> None:
    app.command("speedrun")(speedrun_command)
