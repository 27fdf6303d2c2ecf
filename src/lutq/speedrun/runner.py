"""The stage runner: run a list of stages in order, skip the ones already done, resume the interrupted one.

Each stage works in its own directory `RUN_DIR/<stage name>/`:

    stage.json   written when the stage starts: kind, resolved params, fingerprint
    out/         what the stage produces (a checkpoint, a cache, a table, ...); `@name` in a later stage's
                 params refers to this path
    done.json    written last (atomically), only after the stage's own output check passed: fingerprint,
                 elapsed time, summary figures

A stage is skipped when done.json carries the current fingerprint and its output still checks out. It
is resumed (the kind is called with `ctx.resume = True`, e.g. the trainer's `--resume`) when stage.json
carries the current fingerprint but done.json is missing, i.e. an earlier attempt was interrupted.
Otherwise (new params, or an upstream stage that re-ran) its directory is cleared and it runs afresh.
The fingerprint hashes the kind, the params after budget scaling, and the stamp (fingerprint + finish
time) of every stage the params refer to, so a change or a re-run anywhere re-runs exactly what depends
on it, and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lutq.core.atomic import atomic_write_json
from lutq.core.configs import ConfigBase
from lutq.core.console import console
from lutq.core.errors import LutqError

STAGE_FILE = "stage.json"
DONE_FILE = "done.json"


@dataclass
class StageContext:
    """What a stage's `run` gets besides its params."""

    name: str
    dir: Path  # RUN_DIR/<name>: markers live here
    out: Path  # where the stage writes its output (`@name` resolves to this)
    run_dir: Path
    resume: bool  # an earlier attempt with the same fingerprint was interrupted
    results: dict[str, StageResult]  # earlier stages, by name
    factor: float = 1.0  # budget scale applied to the params


@dataclass
class StageKind:
    """A kind of stage: typed params, how to run it, how to check its output, which params the budget scales.

    `run(ctx, params)` must be safe to call again on a partly written `ctx.out` when `ctx.resume` is
    true (continue) and returns a JSON-able summary dict. `check(ctx, params)` raises LutqError when
    `ctx.out` is not a valid result. The summary's optional "output" entry names the path (inside `ctx.dir`) that
    `@name` refers to, when it is not `ctx.out` itself (e.g. a training run's best/ checkpoint).
    """

    name: str
    params: type[ConfigBase]
    run: Callable[[StageContext, Any], dict[str, Any]]
    check: Callable[[StageContext, Any], None] = lambda ctx, params: None
    scaled: tuple[str, ...] = ()
    description: str = ""


KINDS: dict[str, StageKind] = {}


def register_kind(kind: StageKind) -> StageKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> StageKind:
    """A registered kind, or `package.module:ATTR` naming a StageKind (plugins, tests)."""
    if name in KINDS:
        return KINDS[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            kind = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise LutqError(f"stage kind {name!r}: cannot import ({e})") from e
        if isinstance(kind, StageKind):
            return kind
    raise LutqError(f"unknown stage kind {name!r}; known: {', '.join(sorted(KINDS))} (or module:ATTR)")


@dataclass
class StageSpec:
    """One entry of a recipe: a named stage of some kind with its params (before scaling / refs)."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    scale: tuple[str, ...] | None = None  # params the budget scales (default: the kind's)


@dataclass
class StageResult:
    name: str
    kind: str
    status: str  # "ran" | "resumed" | "skipped"
    out: Path
    elapsed_s: float  # this invocation's time (0 when skipped)
    total_s: float  # time of the run that produced the output (from done.json)
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)
    stamp: str = ""  # fingerprint + when the output was made: what later stages' fingerprints include


# -- params: budget scaling and @references -------------------------------------------------------------
def scale_params(params: dict[str, Any], keys: tuple[str, ...], factor: float) -> dict[str, Any]:
    """Multiply the numeric params named in `keys` by `factor` (ints stay ints: 0 stays 0, others >= 1)."""
    out = dict(params)
    for key in keys:
        v = out.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[key] = (max(1, round(v * factor)) if v else 0) if isinstance(v, int) else v * factor
    return out


def _map_refs(value: Any, fn: Callable[[str, str], Any]) -> Any:
    """Replace every "@stage" / "@stage/sub/path" string (also inside lists and dicts) by fn(stage, sub)."""
    if isinstance(value, str) and value.startswith("@") and len(value) > 1:
        stage, _, sub = value[1:].partition("/")
        return fn(stage, sub)
    if isinstance(value, list | tuple):
        return [_map_refs(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_refs(v, fn) for k, v in value.items()}
    return value


def references(params: dict[str, Any]) -> list[str]:
    found: list[str] = []
    _map_refs(params, lambda stage, sub: found.append(stage))
    return found


def fingerprint(kind: str, params: dict[str, Any], upstream: dict[str, str]) -> str:
    """Hash of kind + params, with each @ref replaced by the referenced stage's stamp (its fingerprint and
    when its output was made), so any re-run of an input (changed, forced, repaired) re-runs this stage."""
    keyed = _map_refs(params, lambda stage, sub: f"@{stage}#{upstream[stage]}/{sub}")
    blob = json.dumps({"kind": kind, "params": keyed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def typed_params(kind: StageKind, params: dict[str, Any], where: str) -> Any:
    """The kind's params dataclass built from the dict (unknown keys and bad values are errors)."""
    cfg = kind.params.from_dict(params, source=where)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def check_stages(stages: list[StageSpec], where: str = "recipe") -> None:
    """Names unique, kinds known, @refs point to earlier stages, params type-check (refs as placeholders)."""
    seen: set[str] = set()
    for s in stages:
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise LutqError(f"{where}: invalid stage name {s.name!r}")
        if s.name in seen:
            raise LutqError(f"{where}: stage name {s.name!r} used twice")
        kind = get_kind(s.kind)
        for ref in references(s.params):
            if ref not in seen:
                raise LutqError(f"{where}: stage {s.name!r} refers to @{ref}, which is not an earlier stage")
        placeholder = _map_refs(s.params, lambda stage, sub: str(Path("/@") / stage / sub))
        typed_params(kind, placeholder, f"{where}: stage {s.name!r}")
        seen.add(s.name)


# -- the runner ---------------------------------------------------------------------------------------
def read_marker(path: Path) -> dict[str, Any] | None:
    """A stage marker (stage.json / done.json), or None when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _clear(stage_dir: Path) -> None:
    if stage_dir.exists():
        shutil.rmtree(stage_dir)


def run_stages(
    stages: list[StageSpec],
    run_dir: str | Path,
    *,
    factor: float = 1.0,
    force: tuple[str, ...] = (),
    stop_after: str | None = None,
) -> list[StageResult]:
    """Run `stages` in order under `run_dir` (see the module doc for skip / resume / re-run).

    `factor` scales each stage's scaled params; `force` names stages to re-run from scratch;
    `stop_after` ends the run after that stage.
    """
    check_stages(stages)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageResult] = {}
    for spec in stages:
        results[spec.name] = _run_one(spec, run_dir, results, factor, spec.name in force)
        if spec.name == stop_after:
            break
    return list(results.values())


def _run_one(spec: StageSpec, run_dir: Path, results: dict[str, StageResult], factor: float,
             force: bool) -> StageResult:
    kind = get_kind(spec.kind)
    params = scale_params(spec.params, kind.scaled if spec.scale is None else spec.scale, factor)
    fp = fingerprint(spec.kind, params, {k: r.stamp for k, r in results.items()})
    stage_dir = run_dir / spec.name
    resolved = _map_refs(params, lambda stage, sub: str(results[stage].out / sub) if sub else str(results[stage].out))
    ctx = StageContext(spec.name, stage_dir, stage_dir / "out", run_dir, False, results, factor)
    cfg = typed_params(kind, resolved, f"stage {spec.name!r}")

    done, started = read_marker(stage_dir / DONE_FILE), read_marker(stage_dir / STAGE_FILE)
    if force:
        _clear(stage_dir)
    elif done and done.get("fingerprint") == fp:
        try:
            kind.check(ctx, cfg)
            console.print(f"[dim]speedrun: {spec.name}: done earlier ({done.get('elapsed_s', 0):.0f} s), skipped[/]")
            return StageResult(spec.name, spec.kind, "skipped", stage_dir / done.get("output", "out"), 0.0,
                               float(done.get("elapsed_s", 0.0)), fp, done.get("summary", {}),
                               f"{fp}@{done.get('finished', '')}")
        except LutqError as e:
            console.print(f"[yellow]speedrun: {spec.name}: output no longer valid ({e}); re-running[/]")
            _clear(stage_dir)
    elif started and started.get("fingerprint") == fp:
        ctx.resume = True
        console.print(f"[yellow]speedrun: {spec.name}: resuming an interrupted attempt[/]")
    elif stage_dir.exists():
        console.print(f"[yellow]speedrun: {spec.name}: params or inputs changed; starting it over[/]")
        _clear(stage_dir)

    console.rule(f"speedrun: {spec.name} ({spec.kind})")
    stage_dir.mkdir(parents=True, exist_ok=True)
    previous = float(started.get("elapsed_before_s", 0.0)) if ctx.resume and started else 0.0
    atomic_write_json(stage_dir / STAGE_FILE, {
        "kind": spec.kind, "fingerprint": fp, "params": resolved, "factor": factor,
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "elapsed_before_s": previous,
    })
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        summary = kind.run(ctx, cfg) or {}
        kind.check(ctx, cfg)
    except BaseException:
        spent = time.perf_counter() - t0
        record = read_marker(stage_dir / STAGE_FILE) or {}
        record["elapsed_before_s"] = previous + spent  # time spent so far counts toward the stage
        atomic_write_json(stage_dir / STAGE_FILE, record)
        console.print(f"[red]speedrun: {spec.name} stopped after {spent:.0f} s; run the same command to resume[/]")
        raise
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    total = previous + elapsed
    output = Path(summary.pop("output", ctx.out)).resolve().relative_to(stage_dir.resolve()).as_posix()
    finished = datetime.now(UTC).isoformat(timespec="microseconds")
    atomic_write_json(stage_dir / DONE_FILE, {
        "fingerprint": fp, "kind": spec.kind, "finished": finished,
        "elapsed_s": total, "cpu_s": cpu, "output": output, "summary": summary,
    })
    console.print(f"[green]speedrun: {spec.name} done in {elapsed:.0f} s[/]")
    return StageResult(spec.name, spec.kind, "resumed" if ctx.resume else "ran", stage_dir / output, elapsed, total,
                       fp, summary, f"{fp}@{finished}")

