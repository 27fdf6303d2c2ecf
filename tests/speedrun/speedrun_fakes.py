"""Fake stage kinds for the runner tests (also imported by a subprocess as `speedrun_fakes:STEPS`)."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.speedrun.runner import StageContext, StageKind, register_kind

CALLS: list[tuple[str, bool]] = []  # (stage, resume) for every run() call in this process


@dataclass
class WriteParams(ConfigBase):
    text: str = "x"
    n: int = 1
    source: Path | None = None


def _run_write(ctx: StageContext, p: WriteParams) -> dict:
    CALLS.append((ctx.name, ctx.resume))
    ctx.out.mkdir(parents=True, exist_ok=True)
    prefix = (p.source / "value.txt").read_text() if p.source else ""
    (ctx.out / "value.txt").write_text(prefix + p.text * p.n)
    return {"length": len(prefix) + len(p.text) * p.n}


def _check_write(ctx: StageContext, p: WriteParams) -> None:
    if not (ctx.out / "value.txt").is_file():
        raise LutqError(f"{ctx.out}/value.txt missing")


@dataclass
class StepsParams(ConfigBase):
    steps: int = 5
    fail_at: int = -1  # raise once on reaching this step (a flag file in the run dir remembers it)
    kill_at: int = -1  # SIGKILL this process once on reaching this step (likewise remembered)
    sleep: float = 0.0


def _run_steps(ctx: StageContext, p: StepsParams) -> dict:
    CALLS.append((ctx.name, ctx.resume))
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = len(list(ctx.out.glob("step_*")))  # continue where an interrupted attempt stopped
    for i in range(start, p.steps):
        flag = ctx.run_dir / f"{ctx.name}.failed-once"
        if i == p.fail_at and not flag.exists():
            flag.touch()
            raise RuntimeError(f"boom at step {i}")
        killed = ctx.run_dir / f"{ctx.name}.killed"
        if i == p.kill_at and not killed.exists():
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(p.sleep)
        (ctx.out / f"step_{i:04d}").touch()
    return {"started_at": start, "steps": p.steps}


def _check_steps(ctx: StageContext, p: StepsParams) -> None:
    n = len(list(ctx.out.glob("step_*")))
    if n != p.steps:
        raise LutqError(f"{ctx.out}: {n} of {p.steps} steps")


@dataclass
class TableParams(ConfigBase):
    inputs: tuple[str, ...] = ()


def _run_table(ctx: StageContext, p: TableParams) -> dict:
    CALLS.append((ctx.name, ctx.resume))
    rows = [{"model": Path(x).parent.name, "files": len(list(Path(x).iterdir()))} for x in p.inputs]
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "rows.json").write_text(json.dumps(rows))
    table = "| model | files |\n|---|---|\n" + "".join(f"| {r['model']} | {r['files']} |\n" for r in rows)
    return {"table": table, "rows": rows}


WRITE = register_kind(StageKind("fake-write", WriteParams, _run_write, _check_write, scaled=("n",)))
STEPS = register_kind(StageKind("fake-steps", StepsParams, _run_steps, _check_steps, scaled=("steps",)))
TABLE = register_kind(StageKind("fake-table", TableParams, _run_table))
