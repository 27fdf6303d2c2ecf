"""The stage runner with fake stages: skip, resume after a failure or a SIGKILL, re-run on changes, budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import speedrun_fakes as fakes

from lutq.core.errors import LutqError
from lutq.speedrun.recipe import load_recipe, parse_recipe, with_overrides
from lutq.speedrun.runner import StageSpec, run_stages, scale_params
from lutq.speedrun.speedrun import SpeedrunConfig, speedrun

HERE = Path(__file__).parent


def _stages(fail_at: int = -1, text: str = "a") -> list[StageSpec]:
    return [
        StageSpec("first", "fake-write", {"text": text, "n": 3}),
        StageSpec("train", "fake-steps", {"steps": 6, "fail_at": fail_at}),
        StageSpec("second", "fake-write", {"text": "b", "source": "@first"}),
        StageSpec("table", "fake-table", {"inputs": ["@train", "@second"]}),
    ]


@pytest.fixture(autouse=True)
def _calls() -> None:
    fakes.CALLS.clear()


def test_runs_then_skips_everything(tmp_path: Path) -> None:
    res = run_stages(_stages(), tmp_path)
    assert [r.status for r in res] == ["ran"] * 4
    assert (tmp_path / "second" / "out" / "value.txt").read_text() == "aaab"  # @first resolved to its out dir
    assert res[-1].summary["rows"] == [{"model": "train", "files": 6}, {"model": "second", "files": 1}]
    assert all((tmp_path / s / "done.json").is_file() for s in ("first", "train", "second", "table"))
    fakes.CALLS.clear()
    res = run_stages(_stages(), tmp_path)
    assert [r.status for r in res] == ["skipped"] * 4 and fakes.CALLS == []
    assert res[-1].summary["rows"][0]["files"] == 6  # summaries survive a skip


def test_failure_mid_stage_then_rerun_resumes(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom at step 3"):
        run_stages(_stages(fail_at=3), tmp_path)
    assert (tmp_path / "first" / "done.json").is_file()
    assert (tmp_path / "train" / "stage.json").is_file() and not (tmp_path / "train" / "done.json").exists()
    assert len(list((tmp_path / "train" / "out").glob("step_*"))) == 3
    fakes.CALLS.clear()
    res = run_stages(_stages(fail_at=3), tmp_path)
    assert [r.status for r in res] == ["skipped", "resumed", "ran", "ran"]
    assert fakes.CALLS == [("train", True), ("second", False), ("table", False)]
    assert res[1].summary == {"started_at": 3, "steps": 6}  # continued, not restarted
    assert json.loads((tmp_path / "train" / "done.json").read_text())["elapsed_s"] >= res[1].elapsed_s


def test_changed_params_rerun_stage_and_dependents_only(tmp_path: Path) -> None:
    run_stages(_stages(), tmp_path)
    fakes.CALLS.clear()
    res = run_stages(_stages(text="z"), tmp_path)  # first changes -> second (refers to it) and table re-run
    assert {r.name: r.status for r in res} == {"first": "ran", "train": "skipped", "second": "ran", "table": "ran"}
    assert (tmp_path / "second" / "out" / "value.txt").read_text() == "zzzb"


def test_invalid_output_is_rerun_and_force(tmp_path: Path) -> None:
    run_stages(_stages(), tmp_path)
    (tmp_path / "first" / "out" / "value.txt").unlink()
    fakes.CALLS.clear()
    res = run_stages(_stages(), tmp_path)  # first re-made -> second (uses it) and table (uses second) re-run
    assert {r.name: r.status for r in res} == {"first": "ran", "train": "skipped", "second": "ran", "table": "ran"}
    res = run_stages(_stages(), tmp_path, force=("train",))
    assert {r.name: r.status for r in res} == {"first": "skipped", "train": "ran", "second": "skipped", "table": "ran"}


def test_budget_scales_declared_params(tmp_path: Path) -> None:
    assert scale_params({"steps": 10, "lr": 0.1, "flag": True}, ("steps", "flag", "lr"), 0.25) == {
        "steps": 2,
        "lr": 0.025,
        "flag": True,
    }
    assert scale_params({"steps": 1, "warmup": 0}, ("steps", "warmup"), 0.01) == {"steps": 1, "warmup": 0}
    res = run_stages(_stages(), tmp_path, factor=0.5)
    assert res[1].summary["steps"] == 3 and res[0].summary["length"] == 2  # n=3 -> 2 ("a"*2)
    res = run_stages(_stages(), tmp_path, factor=1.0)  # a different budget is a different run
    assert [r.status for r in res] == ["ran"] * 4


def test_recipe_validation_errors(tmp_path: Path) -> None:
    def recipe(*stages: dict) -> dict:
        return {"name": "t", "stages": list(stages)}

    with pytest.raises(LutqError, match="unknown stage kind 'nope'"):
        parse_recipe(recipe({"name": "a", "kind": "nope"}))
    with pytest.raises(LutqError, match="refers to @later"):
        parse_recipe(
            recipe(
                {"name": "a", "kind": "fake-write", "params": {"source": "@later"}},
                {"name": "later", "kind": "fake-write"},
            )
        )
    with pytest.raises(LutqError, match=r"unknown key\(s\) \['txt'\]"):
        parse_recipe(recipe({"name": "a", "kind": "fake-write", "params": {"txt": "x"}}))
    with pytest.raises(LutqError, match="used twice"):
        parse_recipe(recipe({"name": "a", "kind": "fake-write"}, {"name": "a", "kind": "fake-write"}))
    with pytest.raises(LutqError, match="report = 'x' is not a stage"):
        parse_recipe({**recipe({"name": "a", "kind": "fake-write"}), "report": "x"})
    with pytest.raises(LutqError, match="unknown recipe 'nonexistent'"):
        load_recipe("nonexistent")


RECIPE = """
name = "fake"
description = "fake stages"
budget_minutes = 10
report = "table"

[[stages]]
name = "train"
kind = "speedrun_fakes:STEPS"
[stages.params]
steps = {steps}
sleep = {sleep}

[[stages]]
name = "table"
kind = "speedrun_fakes:TABLE"
[stages.params]
inputs = ["@train"]
"""


def test_set_overrides_stage_params() -> None:
    base = parse_recipe(
        {
            "name": "t",
            "stages": [
                {"name": "first", "kind": "fake-write", "params": {"text": "a", "n": 3}},
                {"name": "train", "kind": "fake-steps", "params": {"steps": 6}},
            ],
        }
    )
    r = with_overrides(base, ["first.text=zz", "first.n = 5", "train.steps=2", "train.sleep=0.5"])
    assert r.stages[0].params == {"text": "zz", "n": 5} and r.stages[1].params == {"steps": 2, "sleep": 0.5}
    assert base.stages[0].params == {"text": "a", "n": 3}  # the recipe itself is untouched
    assert r.meta["overrides"][0] == "first.text=zz" and with_overrides(base, []) is base
    # TOML values: quoted strings, @refs (checked like the recipe's own), tables, lists
    three = parse_recipe(
        {
            "name": "t",
            "stages": [
                *[{"name": s.name, "kind": s.kind, "params": s.params} for s in base.stages],
                {"name": "table", "kind": "fake-table", "params": {"inputs": ["@train"]}},
            ],
        }
    )
    r = with_overrides(three, ['first.text="b c"', 'table.inputs=["@first", "@train"]'])
    assert r.stages[0].params["text"] == "b c" and r.stages[2].params["inputs"] == ["@first", "@train"]
    with pytest.raises(LutqError, match="refers to @table, which is not an earlier stage"):
        with_overrides(three, ["first.source=@table"])
    # nested keys extend a table param, or create it (the built-in recipe's real stage kinds type-check them)
    import lutq.speedrun.stages  # noqa: F401  (registers the built-in stage kinds)

    d = load_recipe(
        "default", ["q2a4.kd.full_kl_weight=0.5", "q2a4_init.blockwise.lr=3e-3", "q4a4_init.preset=q4a4_r32"]
    )  # load_recipe applies them through with_overrides
    by_name = {s.name: s.params for s in d.stages}
    assert by_name["q2a4"]["kd"] == {"hard_top1_weight": 0.0, "full_kl_weight": 0.5}
    assert by_name["q2a4_init"]["blockwise"] == {"steps": 100, "lr": 3e-3}
    assert by_name["q4a4_init"]["preset"] == "q4a4_r32"
    with pytest.raises(LutqError, match="expected STAGE.KEY=VALUE"):
        with_overrides(base, ["train.steps"])
    with pytest.raises(LutqError, match="expected STAGE.KEY=VALUE"):
        with_overrides(base, ["steps=3"])
    with pytest.raises(LutqError, match="no stage 'nope'.*stages: first, train"):
        with_overrides(base, ["nope.steps=3"])
    with pytest.raises(LutqError, match=r"--set train.stepz=3.*unknown key\(s\) \['stepz'\]"):
        with_overrides(base, ["train.stepz=3"])
    with pytest.raises(LutqError, match="train.steps is 6, not a table"):
        with_overrides(base, ["train.steps.x=3"])


def test_speedrun_prints_table_and_appends_log(tmp_path: Path) -> None:
    path = tmp_path / "fake.toml"
    path.write_text(RECIPE.format(steps=4, sleep=0))
    cfg = SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "sr", budget=5)
    res = speedrun(cfg)
    assert res.rows == [{"model": "train", "files": 2}]  # budget 5 of 10 min: 4 steps -> 2
    speedrun(cfg)
    over = speedrun(
        SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "sr", budget=5, overrides=("train.steps=8",))
    )  # --set: the changed stage and its dependents
    assert over.rows == [{"model": "train", "files": 4}] and [r.status for r in over.stages] == ["ran", "ran"]
    lines = (tmp_path / "runs" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["overrides"] == ["train.steps=8"]
    entry = json.loads(lines[1])
    assert entry["recipe"] == "fake" and entry["status"] == "complete" and entry["figures"] == res.rows
    assert [s["status"] for s in entry["stages"]] == ["skipped", "skipped"]
    assert {"date", "machine", "device", "cpus", "budget_minutes"} <= set(entry)
    md = (tmp_path / "runs" / "log.md").read_text()
    assert md.startswith("# Speedrun log") and md.count("## ") == 3 and "| train | 2 |" in md


def test_sigkill_mid_stage_then_rerun_continues(tmp_path: Path) -> None:
    """Kill the real CLI process mid-stage; the same command continues the stage instead of restarting it."""
    path = tmp_path / "fake.toml"
    path.write_text(RECIPE.format(steps=60, sleep=0.05))
    cmd = [sys.executable, "-m", "lutq.cli", "speedrun", str(path), "--run-dir", str(tmp_path / "sr")]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "sr" / "train" / "out"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(list(out.glob("step_*"))) < 5:
            assert proc.poll() is None and time.time() < deadline, "speedrun exited or stalled before the kill"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = len(list(out.glob("step_*")))
    assert 5 <= killed_at < 60 and not (tmp_path / "sr" / "train" / "done.json").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    done = json.loads((tmp_path / "sr" / "train" / "done.json").read_text())
    assert done["summary"]["started_at"] == killed_at
    assert len(list(out.glob("step_*"))) == 60


def test_failed_speedrun_is_logged_then_resumes(tmp_path: Path) -> None:
    path = tmp_path / "fail.toml"
    path.write_text(RECIPE.format(steps=4, sleep=0).replace("sleep = 0\n", "sleep = 0\nfail_at = 2\n"))
    cfg = SpeedrunConfig(recipe=str(path), run_dir=tmp_path / "runs" / "sr")
    with pytest.raises(RuntimeError, match="boom at step 2"):
        speedrun(cfg)
    entry = json.loads((tmp_path / "runs" / "log.jsonl").read_text().splitlines()[-1])
    assert entry["status"] == "failed (RuntimeError)" and "boom" in entry["error"] and entry["stages"] == []
    res = speedrun(cfg)
    assert [r.status for r in res.stages] == ["resumed", "ran"] and res.stages[0].summary["started_at"] == 2
