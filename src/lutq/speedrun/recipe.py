"""Speedrun recipes: TOML files listing the stages to run, with a wall-clock budget they are sized for.

    name = "default"
    description = "..."
    budget_minutes = 30          # what the step / sequence counts below are sized for
    report = "eval"              # the stage whose summary holds the final comparison table

    [[stages]]
    name = "cache"               # its output directory: RUN_DIR/cache/out, referred to as "@cache"
    kind = "cache"               # a registered StageKind (see `lutq speedrun --kinds`)
    scale = ["num_sequences"]    # optional: which params `--budget` scales (default: the kind's)
    [stages.params]              # the kind's typed params (unknown keys are an error)
    source = "sharegpt"

Built-in recipes live in `lutq/recipes/*.toml`; any other path works too. `with_overrides(recipe, ["STAGE.KEY=VALUE"])`
changes a stage's params from the command line (`lutq speedrun --set q4a4_init.preset=q4a4_r32`).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError
from lutq.speedrun.runner import StageSpec, check_stages

RECIPE_KEYS = {"name", "description", "budget_minutes", "report", "stages"}
STAGE_KEYS = {"name", "kind", "scale", "params"}


@dataclass
class Recipe:
    name: str
    stages: list[StageSpec]
    description: str = ""
    budget_minutes: float = 30.0
    report: str | None = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def factor(self, budget_minutes: float | None) -> float:
        """How much `--budget` scales the recipe's step / sequence counts."""
        if budget_minutes is None:
            return 1.0
        if budget_minutes <= 0:
            raise LutqError(f"--budget must be > 0 minutes, got {budget_minutes}")
        return budget_minutes / self.budget_minutes


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> path (the TOML files packaged in lutq/recipes/)."""
    root = resources.files("lutq") / "recipes"
    if not root.is_dir():
        return {}
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def load_recipe(name_or_path: str | Path = "default", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A built-in recipe by name, or a TOML file, with `STAGE.KEY=VALUE` overrides applied (`with_overrides`);
    validated (kinds, refs, typed params)."""
    path = Path(name_or_path)
    builtins = builtin_recipes()
    if not path.is_file():
        if str(name_or_path) not in builtins:
            raise LutqError(
                f"unknown recipe {str(name_or_path)!r}: not a file, and the built-ins are {', '.join(sorted(builtins))}"
            )
        path = builtins[str(name_or_path)]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LutqError(f"{path}: cannot parse TOML ({e})") from e
    return with_overrides(parse_recipe(data, path), overrides)


def parse_recipe(data: dict[str, Any], path: Path | None = None) -> Recipe:
    where = str(path or "recipe")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise LutqError(f"{where}: unknown key(s) {unknown}; valid: {sorted(RECIPE_KEYS)}")
    stages = []
    for i, s in enumerate(data.get("stages", [])):
        bad = sorted(set(s) - STAGE_KEYS)
        if bad or "name" not in s or "kind" not in s:
            raise LutqError(f"{where}: stages[{i}] needs name and kind, may have scale and params (unknown: {bad})")
        scale = s.get("scale")
        if scale is not None and (not isinstance(scale, list) or not all(isinstance(k, str) for k in scale)):
            raise LutqError(f"{where}: stages[{i}] scale must be a list of param names, got {scale!r}")
        scale = tuple(scale) if scale is not None else None
        stages.append(StageSpec(s["name"], s["kind"], dict(s.get("params", {})), scale))
    if not stages:
        raise LutqError(f"{where}: no [[stages]]")
    check_stages(stages, where)
    budget = float(data.get("budget_minutes", 30.0))
    if budget <= 0:
        raise LutqError(f"{where}: budget_minutes must be > 0, got {budget}")
    report = data.get("report")
    if report is not None and report not in {s.name for s in stages}:
        raise LutqError(f"{where}: report = {report!r} is not a stage")
    name = data.get("name") or (path.stem if path else "recipe")
    return Recipe(
        name=name,
        stages=stages,
        description=data.get("description", ""),
        budget_minutes=budget,
        report=report,
        path=path,
    )


def with_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """A copy of `recipe` with `STAGE.KEY[.SUBKEY...]=VALUE` overrides applied to stage params, re-validated.

    VALUE is read as a TOML value (`400`, `1e-4`, `true`, `"@cache"`, `{ full_kl_weight = 0.5 }`, `[1, 2]`); anything
    that is not valid TOML is taken as a bare string (`q4a4_r32`). Nested keys set inside a table param
    (`q2a4.kd.full_kl_weight=0.5`), creating it if absent.
    """
    if not overrides:
        return recipe
    stages = {s.name: replace(s, params=copy.deepcopy(s.params)) for s in recipe.stages}
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise LutqError(f"--set {item!r}: expected STAGE.KEY=VALUE (e.g. q4a4.steps=400)")
        stage = stages.get(path[0])
        if stage is None:
            raise LutqError(
                f"--set {item!r}: no stage {path[0]!r} in recipe {recipe.name!r}; stages: {', '.join(stages)}"
            )
        target = stage.params
        for part in path[1:-1]:
            sub = target.setdefault(part, {})
            if not isinstance(sub, dict):
                raise LutqError(f"--set {item!r}: {path[0]}.{part} is {sub!r}, not a table")
            target = sub
        target[path[-1]] = _toml_value(raw.strip())
    out = replace(
        recipe, stages=[stages[s.name] for s in recipe.stages], meta={**recipe.meta, "overrides": list(overrides)}
    )
    check_stages(out.stages, f"recipe {recipe.name!r} with --set {' '.join(overrides)}")
    return out


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
