"""Audit of the speedrun runner: SIGKILLs of the real CLI at chosen points (mid-stage, between a stage's output
check and its done.json, during the run-log append, in a --force'd run), and the defects found around them:
--force / --stop-after naming no stage, a missing `@stage` output, a checkpoint without its weights, a forced
clear that is interrupted, budget scaling of defaulted params and of bad `scale` lists, --dry-run of plugin kinds.

Run as a subprocess (`python -m lutq.cli speedrun` on a recipe naming `test_speedrun_audit:KIND`), this module
installs the SIGKILL hooks that $AUDIT_KILL names; under pytest it installs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import speedrun_fakes as fakes

import lutq.speedrun.log as sr_log
import lutq.speedrun.runner as runner
from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.speedrun.recipe import parse_recipe
from lutq.speedrun.runner import StageContext, StageKind, StageSpec, fingerprint, register_kind, run_stages
from lutq.speedrun.speedrun import SpeedrunConfig, speedrun

HERE = Path(__file__).parent
WRITE, TABLE = fakes.WRITE, fakes.TABLE


# -- kinds (also used by the subprocess) ---------------------------------------------------------------------


@dataclass
class TwoFileParams(ConfigBase):
    text: str = "x"


def _run_two(ctx: StageContext, p: TwoFileParams) -> dict:
    """Writes data/ and best/ (its `@name` output); the check only looks at a marker, like a shallow output check."""
    (ctx.out / "best").mkdir(parents=True, exist_ok=True)
    (ctx.out / "best" / "data.bin").write_text(p.text)
    (ctx.out / "marker").write_text("ok")
    return {"output": str(ctx.out / "best")}


def _check_two(ctx: StageContext, p: TwoFileParams) -> None:
    if not (ctx.out / "marker").is_file():
        raise LutqError("marker missing")


TWO = register_kind(StageKind("audit-two", TwoFileParams, _run_two, _check_two))


def _install_kill_hooks() -> None:
    """$AUDIT_KILL: "done:STAGE" kills just before STAGE's done.json is written (its output is complete and checked),
    "log:N" kills at the N-th atomic write of the run log (1: log.jsonl, 2: log.md). Once per $AUDIT_FLAG file."""
    kill, flag = os.environ.get("AUDIT_KILL", ""), Path(os.environ.get("AUDIT_FLAG", "/nonexistent/flag"))

    def die() -> None:
        if not flag.exists():
            flag.write_text(kill)
            os.kill(os.getpid(), signal.SIGKILL)

    if kill.startswith("done:"):
        stage, write_json = kill.split(":", 1)[1], runner.atomic_write_json

        def patched_json(path: Path, obj: object) -> Path:
            if Path(path).name == runner.DONE_FILE and Path(path).parent.name == stage:
                die()
            return write_json(path, obj)

        runner.atomic_write_json = patched_json
    elif kill.startswith("log:"):
        n, write_text, calls = int(kill.split(":", 1)[1]), sr_log.atomic_write_text, []

        def patched_text(path: Path, text: str) -> Path:
            calls.append(path)
            if len(calls) == n:
                die()
            return write_text(path, text)

        sr_log.atomic_write_text = patched_text


if os.environ.get("AUDIT_KILL"):  # only the subprocesses below set it
    _install_kill_hooks()


# -- helpers ----------------------------------------------------------------------------------------------------
RECIPE = """
name = "audit"
budget_minutes = 10
report = "table"

[[stages]]
name = "first"
kind = "test_speedrun_audit:WRITE"
[stages.params]
text = "a"
n = 3

[[stages]]
name = "train"
kind = "speedrun_fakes:STEPS"
[stages.params]
steps = 6
kill_at = {kill_at}

[[stages]]
name = "second"
kind = "test_speedrun_audit:WRITE"
[stages.params]
text = "b"
source = "@first"

[[stages]]
name = "table"
kind = "test_speedrun_audit:TABLE"
[stages.params]
inputs = ["@train", "@second"]
"""


class Cli:
    """`python -m lutq.cli speedrun RECIPE --run-dir ...` in a subprocess, with optional SIGKILL hooks."""

    def __init__(self, tmp: Path, kill_at: int = -1) -> None:
        self.tmp, self.run_dir = tmp, tmp / "runs" / "sr"
        self.recipe = tmp / "audit.toml"
        self.recipe.write_text(RECIPE.format(kill_at=kill_at))
        self.flag = tmp / "hook.flag"

    def __call__(self, *args: str, kill: str = "") -> int:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "AUDIT_KILL": kill,
            "AUDIT_FLAG": str(self.flag),
        }
        cmd = [sys.executable, "-m", "lutq.cli", "speedrun", str(self.recipe), "--run-dir", str(self.run_dir), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120).returncode

    def done(self, stage: str) -> dict:
        return json.loads((self.run_dir / stage / "done.json").read_text())

    def log(self) -> list[dict]:
        path = self.tmp / "runs" / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def statuses(self, entry: int = -1) -> dict[str, str]:
        return {s["name"]: s["status"] for s in self.log()[entry]["stages"]}


# -- SIGKILL of the real CLI -----------------------------------------------------------------------------------
def test_sigkill_before_done_marker_and_during_log_append(tmp_path: Path) -> None:
    """Killed after a stage's output passed its check but before done.json: the rerun resumes it (a no-op here)
    rather than skipping or restarting it; killed between the two log files: both stay well-formed."""
    cli = Cli(tmp_path)
    assert cli(kill="done:train") == -signal.SIGKILL
    assert cli.log() == [] and not (cli.run_dir / "train" / "done.json").exists()
    assert cli() == 0
    assert cli.statuses() == {"first": "skipped", "train": "resumed", "second": "ran", "table": "ran"}
    assert cli.done("train")["summary"] == {"started_at": 6, "steps": 6}  # continued, nothing re-made
    assert cli.log()[0]["command"].startswith("lutq speedrun ")  # `python -m lutq.cli` was logged "speedrun()"

    cli.flag.unlink()
    assert cli(kill="log:2") == -signal.SIGKILL  # log.jsonl written, log.md not yet
    assert cli() == 0
    entries = cli.log()  # every line parses
    assert len(entries) == 3 and [set(cli.statuses(i).values()) for i in (1, 2)] == [{"skipped"}] * 2
    md = (tmp_path / "runs" / "log.md").read_text()
    assert md.startswith("# Speedrun log") and md.count("# Speedrun log") == 1 and md.count("\n## ") == 2
    assert not [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]  # no temp files


def test_forced_run_killed_then_same_command_continues(tmp_path: Path) -> None:
    """`--force train` killed mid-train, or after train was re-made: the same command continues (train resumes /
    stays done, its dependents are re-made once) instead of forcing train again; a later --force forces anew."""
    cli = Cli(tmp_path, kill_at=3)
    (tmp_path / "runs" / "sr").mkdir(parents=True)
    (tmp_path / "runs" / "sr" / "train.killed").touch()  # no kill on the first, complete run
    assert cli() == 0
    made = cli.done("train")["finished"]

    (tmp_path / "runs" / "sr" / "train.killed").unlink()
    assert cli("--force", "train") == -signal.SIGKILL  # forced: cleared and restarted, killed at step 3
    assert len(list((cli.run_dir / "train" / "out").glob("step_*"))) == 3
    assert cli("--force", "train") == 0  # the same command again
    assert cli.statuses() == {"first": "skipped", "train": "resumed", "second": "skipped", "table": "ran"}
    assert cli.done("train")["summary"]["started_at"] == 3 and cli.done("train")["finished"] != made

    made = cli.done("train")["finished"]
    assert cli("--force", "train", kill="done:table") == -signal.SIGKILL  # train re-made, killed in table
    forced = cli.done("train")["finished"]
    assert forced != made
    assert cli("--force", "train") == 0
    assert cli.statuses() == {"first": "skipped", "train": "skipped", "second": "skipped", "table": "resumed"}
    assert cli.done("train")["finished"] == forced  # not forced a second time

    assert cli("--force", "train") == 0  # the previous --force command finished: a new one forces again
    assert cli.statuses()["train"] == "ran" and cli.statuses()["table"] == "ran"
    assert cli.done("train")["finished"] != forced
    assert cli() == 0 and set(cli.statuses().values()) == {"skipped"}


# -- in-process: defects --------------------------------------------------------------------------------------
def _stages(text: str = "a") -> list[StageSpec]:
    return [
        StageSpec("first", "fake-write", {"text": text, "n": 3}),
        StageSpec("train", "fake-steps", {"steps": 6}),
        StageSpec("second", "fake-write", {"text": "b", "source": "@first"}),
    ]


def test_force_and_stop_after_must_name_a_stage(tmp_path: Path) -> None:
    run_stages(_stages(), tmp_path / "sr")
    with pytest.raises(LutqError, match=r"--force 'trian': no such stage.*first, train, second"):
        run_stages(_stages(), tmp_path / "sr", force=("trian",))
    with pytest.raises(LutqError, match=r"--stop-after 'trian': no such stage"):
        run_stages(_stages(), tmp_path / "sr", stop_after="trian")
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[[stages]]\nname = "first"\nkind = "fake-write"\n')
    with pytest.raises(LutqError, match="--force 'nope'"):
        speedrun(SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "r", force=("nope",)))
    assert not (tmp_path / "runs" / "log.jsonl").exists()  # a typo is not logged as a failed run


def test_missing_at_output_is_not_skipped(tmp_path: Path) -> None:
    """done.json names the `@stage` output (here best/); when it is gone the stage re-runs even if check passes."""
    stages = [StageSpec("two", "audit-two", {}), StageSpec("use", "fake-table", {"inputs": ["@two"]})]
    run_stages(stages, tmp_path)
    (tmp_path / "two" / "out" / "best" / "data.bin").unlink()
    (tmp_path / "two" / "out" / "best").rmdir()
    res = {r.name: r for r in run_stages(stages, tmp_path)}
    assert res["two"].status == "ran" and res["two"].out.is_dir() and res["use"].status == "ran"


def test_interrupted_forced_clear_does_not_leave_a_done_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --force clears the stage dir; killed part-way (here: best/ already gone), the old done.json must not
    survive, or a later run without --force would skip a stage whose output is incomplete."""
    stages = [StageSpec("two", "audit-two", {})]
    run_stages(stages, tmp_path)
    rmtree = runner.shutil.rmtree

    def interrupted(path: Path, *a: object, **k: object) -> None:
        rmtree(Path(path) / "out" / "best")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, tmp_path, force=("two",))
    monkeypatch.undo()
    (res,) = run_stages(stages, tmp_path)
    assert res.status != "skipped" and (tmp_path / "two" / "out" / "best" / "data.bin").is_file()


def _fake_checkpoint(path: Path) -> Path:
    from lutq.models.checkpoint import FORMAT, FORMAT_VERSION, WEIGHTS

    path.mkdir(parents=True)
    data = b"\0" * 64
    (path / WEIGHTS).write_bytes(data)
    (path / "config.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "architecture": "Qwen3ForCausalLM",
                "base_config": {},
                "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            }
        )
    )
    return path


def test_checkpoint_check_needs_its_weights(tmp_path: Path) -> None:
    """The docs: done.json is written after "the checkpoint loads"; a checkpoint whose weights are missing or
    truncated must fail the output check (else a later run skips the stage on a broken output)."""
    from lutq.speedrun.runner import KINDS
    from lutq.speedrun.stages import _check_ckpt  # noqa: F401  (registers the built-in kinds)

    ckpt = _fake_checkpoint(tmp_path / "out")
    ctx = SimpleNamespace(out=ckpt)
    KINDS["snap"].check(ctx, None)  # complete: passes
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(LutqError, match="truncated"):
        KINDS["snap"].check(ctx, None)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(LutqError, match="missing"):
        KINDS["quantize"].check(ctx, None)
    run = _fake_checkpoint(tmp_path / "run" / "best").parent
    KINDS["train"].check(SimpleNamespace(out=run), None)
    (run / "best" / "model.safetensors").unlink()
    with pytest.raises(LutqError, match="missing"):
        KINDS["train"].check(SimpleNamespace(out=run), None)


# -- budget -----------------------------------------------------------------------------------------------------
def test_budget_scales_params_left_at_their_default(tmp_path: Path) -> None:
    """`steps` is a scaled param of fake-steps; left at its default (5) it must scale like a written one."""
    (res,) = run_stages([StageSpec("t", "fake-steps", {})], tmp_path / "a", factor=0.4)
    assert res.summary["steps"] == 2
    (res,) = run_stages([StageSpec("t", "fake-steps", {"steps": 5})], tmp_path / "b", factor=0.4)
    assert res.summary["steps"] == 2
    # at factor 1 nothing is added: the fingerprint (and so an existing run dir) is unchanged
    (res,) = run_stages([StageSpec("t", "fake-steps", {})], tmp_path / "c")
    assert res.fingerprint == fingerprint("fake-steps", {}, {})


def test_scale_must_name_params_of_the_kind() -> None:
    def recipe(scale: object) -> dict:
        return {"name": "t", "stages": [{"name": "a", "kind": "fake-steps", "scale": scale, "params": {"steps": 4}}]}

    assert parse_recipe(recipe(["steps"])).stages[0].scale == ("steps",)
    with pytest.raises(LutqError, match=r"scale.*'stpes'"):
        parse_recipe(recipe(["stpes"]))
    with pytest.raises(LutqError, match="scale"):
        parse_recipe(recipe("steps"))  # a string, not a list: would scale nothing


def test_dry_run_scales_plugin_kinds_like_the_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lutq.cli import app

    path = tmp_path / "r.toml"
    path.write_text(
        'name = "r"\nbudget_minutes = 10\n[[stages]]\nname = "t"\nkind = "speedrun_fakes:STEPS"\n'
        "[stages.params]\nsteps = 8\n"
        '[[stages]]\nname = "d"\nkind = "speedrun_fakes:STEPS"\n'
    )
    res = CliRunner().invoke(app, ["speedrun", str(path), "--dry-run", "--budget", "5"])
    assert res.exit_code == 0, res.output
    assert "t [speedrun_fakes:STEPS]: {'steps': 4}" in res.output  # what the run uses, not 8
    assert "d [speedrun_fakes:STEPS]: {'steps': 2}" in res.output  # the default 5, scaled


def test_failed_run_logs_only_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted before it reached the changed stages must not log the old run's figures as its own."""
    path = tmp_path / "r.toml"
    path.write_text(
        'name = "r"\nreport = "table"\n'
        '[[stages]]\nname = "first"\nkind = "fake-write"\n'
        '[[stages]]\nname = "train"\nkind = "fake-steps"\n[stages.params]\nsteps = 2\n'
        '[[stages]]\nname = "table"\nkind = "fake-table"\n[stages.params]\ninputs = ["@train"]\n'
    )
    cfg = SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "r")
    assert speedrun(cfg).rows == [{"model": "train", "files": 2}]

    def interrupted(ctx: StageContext, p: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while `first` is checked, before train (changed by --set) is cleared

    monkeypatch.setattr(fakes.WRITE, "check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        speedrun(SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "r", overrides=("train.steps=4",)))
    entry = json.loads((tmp_path / "runs" / "log.jsonl").read_text().splitlines()[-1])
    assert entry["status"] == "failed (KeyboardInterrupt)" and entry["overrides"] == ["train.steps=4"]
    assert entry["figures"] == [] and entry["table"] == "" and entry["stages"] == []


def test_recipe_edits_between_runs(tmp_path: Path) -> None:
    """Added, removed, reordered and renamed stages: only what is new or depends on something new runs."""

    def statuses(stages: list[StageSpec]) -> dict[str, str]:
        return {r.name: r.status for r in run_stages(stages, tmp_path)}

    first, train, second = _stages()
    table = StageSpec("table", "fake-table", {"inputs": ["@train", "@second"]})
    assert set(statuses([first, train, second, table]).values()) == {"ran"}
    extra = StageSpec("extra", "fake-write", {"text": "e"})
    assert statuses([first, extra, train, second, table]) == {
        "first": "skipped",
        "extra": "ran",
        "train": "skipped",
        "second": "skipped",
        "table": "skipped",
    }
    assert set(statuses([train, first, second, table]).values()) == {"skipped"}  # reordered, extra removed
    only_second = StageSpec("table", "fake-table", {"inputs": ["@second"]})
    assert statuses([first, second, only_second]) == {"first": "skipped", "second": "skipped", "table": "ran"}
    renamed = StageSpec("first2", "fake-write", {"text": "a", "n": 3})
    second2 = StageSpec("second", "fake-write", {"text": "b", "source": "@first2"})
    assert statuses([renamed, train, second2, table]) == {
        "first2": "ran",
        "train": "skipped",
        "second": "ran",
        "table": "ran",
    }
    assert (tmp_path / "second" / "out" / "value.txt").read_text() == "aaab"


def test_a_quantize_stage_partial_table_changes_only_its_keys() -> None:
    from lutq.speedrun.stages import QuantizeParams, stage_quant_config

    # {mlp = {rank = 8}} over q4a4: 16 entries at rank 8 (a partial table used to take LayerSpec's or
    # QuantConfig's defaults for the keys it did not name)
    cfg = stage_quant_config(QuantizeParams(preset="q4a4", config={"mlp": {"rank": 8}, "tighten_rounds": 2}))
    assert (cfg.mlp.lut_size, cfg.mlp.rank, cfg.attn.rank, cfg.tighten_rounds) == (16, 8, 4, 2)
    assert cfg.preset == "q4a4"
    plain = stage_quant_config(QuantizeParams(preset="q2a4", lut_kind="kmeans"))
    assert (plain.mlp.lut_size, plain.mlp.rank, plain.mlp.lut_kind, plain.attn.lut_kind) == (4, 32, "kmeans", "kmeans")
