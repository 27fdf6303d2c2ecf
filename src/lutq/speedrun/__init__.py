"""`lutq speedrun`: TOML recipes of pipeline stages and a runner that skips finished stages and resumes the
interrupted one; prints the comparison table and appends to the run log."""

from lutq.speedrun.recipe import Recipe, builtin_recipes, load_recipe
from lutq.speedrun.runner import KINDS, StageContext, StageKind, StageResult, StageSpec, register_kind, run_stages
from lutq.speedrun.speedrun import SpeedrunConfig, SpeedrunResult, speedrun

__all__ = [
    "KINDS",
    "Recipe",
    "SpeedrunConfig",
    "SpeedrunResult",
    "StageContext",
    "StageKind",
    "StageResult",
    "StageSpec",
    "builtin_recipes",
    "load_recipe",
    "register_kind",
    "run_stages",
    "speedrun",
]
