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

import dataclasses
import hashlib
import importlib
import json
import shutil
import time
import uuid
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
# the --force list of a run that has not finished yet (stage names cannot start with "."): running the same
# command again continues it instead of forcing the stages it already re-made once more
FORCE_FILE = ".force.json"


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
def scale_params(
    params: dict[str, Any], keys: tuple[str, ...], factor: float, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Multiply the numeric params named in `keys` by `factor` (ints stay ints: 0 stays 0, others >= 1).

    A key absent from `params` is scaled from `defaults` (the kind's default) and added only when scaling
    changes it, so an unscaled stage keeps its params (and fingerprint)."""
    out = dict(params)
    for key in keys:
        v = out.get(key, (defaults or {}).get(key))
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        scaled = (max(1, round(v * factor)) if v else 0) if isinstance(v, int) else v * factor
        if key in out or scaled != v:
            out[key] = scaled
    return out


def param_defaults(cls: type) -> dict[str, Any]:
    """The fields of a params dataclass that have a plain default."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def stage_params(spec: StageSpec, factor: float) -> dict[str, Any]:
    """`spec`'s params after budget scaling (its `scale` list, else its kind's), defaults included."""
    kind = get_kind(spec.kind)
    keys = kind.scaled if spec.scale is None else spec.scale
    return scale_params(spec.params, keys, factor, param_defaults(kind.params))


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
        if s.scale is not None:  # a typo would silently leave the param unscaled by --budget
            if isinstance(s.scale, str) or not all(isinstance(k, str) for k in s.scale):
                raise LutqError(f"{where}: stage {s.name!r}: scale must be a list of param names, got {s.scale!r}")
            is_dc = dataclasses.is_dataclass(kind.params)
            names = {f.name for f in dataclasses.fields(kind.params)} if is_dc else set()
            unknown = sorted(set(s.scale) - names)
            if names and unknown:
                raise LutqError(
                    f"{where}: stage {s.name!r}: scale names unknown param(s) {unknown}; valid: {sorted(names)}"
                )
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
    # the markers go first: a clear interrupted part-way must not leave a done.json over a partial output
    for marker in (DONE_FILE, STAGE_FILE):
        (stage_dir / marker).unlink(missing_ok=True)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)


def check_selection(stages: list[StageSpec], force: tuple[str, ...] = (), stop_after: str | None = None) -> None:
    """--force / --stop-after must name stages of the recipe (a typo would force nothing / run everything)."""
    names = [s.name for s in stages]
    for option, values in (("--force", force), ("--stop-after", (stop_after,) if stop_after is not None else ())):
        for value in values:
            if value not in names:
                raise LutqError(f"{option} {value!r}: no such stage; stages: {', '.join(names)}")


def _force_token(run_dir: Path, force: tuple[str, ...]) -> str | None:
    """The token of this --force list: the unfinished run's when it forced the same stages (the same command run
    again continues it), else a new one. A run with another (or no) --force list abandons the unfinished one."""
    pending = read_marker(run_dir / FORCE_FILE) or {}
    if force and sorted(pending.get("force", [])) == sorted(force) and pending.get("token"):
        return str(pending["token"])
    (run_dir / FORCE_FILE).unlink(missing_ok=True)
    if not force:
        return None
    token = uuid.uuid4().hex[:16]
    atomic_write_json(
        run_dir / FORCE_FILE,
        {"force": sorted(force), "token": token, "started": datetime.now(UTC).isoformat(timespec="seconds")},
    )
    return token


def run_stages(
    stages: list[StageSpec],
    run_dir: str | Path,
    *,
    factor: float = 1.0,
    force: tuple[str, ...] = (),
    stop_after: str | None = None,
    results: dict[str, StageResult] | None = None,
) -> list[StageResult]:
    """Run `stages` in order under `run_dir` (see the module doc for skip / resume / re-run).

    `factor` scales each stage's scaled params; `force` names stages to re-run from scratch (once: the same
    `force` list after an interrupted run continues it); `stop_after` ends the run after that stage.
    `results`, when given, is filled stage by stage (what a run that stops with an exception got through).
    """
    check_stages(stages)
    check_selection(stages, force, stop_after)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    token = _force_token(run_dir, tuple(force))
    results = {} if results is None else results
    for spec in stages:
        results[spec.name] = _run_one(spec, run_dir, results, factor, token if spec.name in force else None)
        if spec.name == stop_after:
            break
    (run_dir / FORCE_FILE).unlink(missing_ok=True)  # this --force is done: a new one forces again
    return list(results.values())


def _run_one(
    spec: StageSpec, run_dir: Path, results: dict[str, StageResult], factor: float, force: str | None
) -> StageResult:
    """Run, resume or skip one stage. `force`: the --force token when this stage is forced (see _force_token)."""
    kind = get_kind(spec.kind)
    params = stage_params(spec, factor)
    fp = fingerprint(spec.kind, params, {k: r.stamp for k, r in results.items()})
    stage_dir = run_dir / spec.name
    resolved = _map_refs(params, lambda stage, sub: str(results[stage].out / sub) if sub else str(results[stage].out))
    ctx = StageContext(spec.name, stage_dir, stage_dir / "out", run_dir, False, results, factor)
    cfg = typed_params(kind, resolved, f"stage {spec.name!r}")

    done, started = read_marker(stage_dir / DONE_FILE), read_marker(stage_dir / STAGE_FILE)
    # forced by this --force command already (it was interrupted later): continue, do not force it again
    forced_before = force is not None and force in ((done or {}).get("force_token"), (started or {}).get("force_token"))
    if force is not None and not forced_before:
        _clear(stage_dir)
    elif done and done.get("fingerprint") == fp:
        try:
            if not (stage_dir / done.get("output", "out")).exists():
                raise LutqError(f"{stage_dir / done.get('output', 'out')} is missing")
            kind.check(ctx, cfg)
            console.print(f"[dim]speedrun: {spec.name}: done earlier ({done.get('elapsed_s', 0):.0f} s), skipped[/]")
            return StageResult(
                spec.name,
                spec.kind,
                "skipped",
                stage_dir / done.get("output", "out"),
                0.0,
                float(done.get("elapsed_s", 0.0)),
                fp,
                done.get("summary", {}),
                f"{fp}@{done.get('finished', '')}",
            )
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
    atomic_write_json(
        stage_dir / STAGE_FILE,
        {
            "kind": spec.kind,
            "fingerprint": fp,
            "params": resolved,
            "factor": factor,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_before_s": previous,
            "force_token": force,
        },
    )
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
    atomic_write_json(
        stage_dir / DONE_FILE,
        {
            "fingerprint": fp,
            "kind": spec.kind,
            "finished": finished,
            "elapsed_s": total,
            "cpu_s": cpu,
            "output": output,
            "summary": summary,
            "force_token": force,
        },
    )
    console.print(f"[green]speedrun: {spec.name} done in {elapsed:.0f} s[/]")
    return StageResult(
        spec.name,
        spec.kind,
        "resumed" if ctx.resume else "ran",
        stage_dir / output,
        elapsed,
        total,
        fp,
        summary,
        f"{fp}@{finished}",
    )
