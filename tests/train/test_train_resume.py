"""Exact resume: SIGKILL a real `lutq train` process after it saved a checkpoint, resume it, and get
the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lutq.train import TrainConfig, train
from lutq.train.run_dir import RunDir, read_csv

STEPS = 60
COMPARED = (
    "loss",
    "kd",
    "kl",
    "ce",
    "top1_agree",
    "lr",
    "grad_norm",
    "tokens",
    "eval_loss",
    "eval_kd",
    "eval_kl",
    "eval_top1_agree",
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(kd, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lutq.cli",
        "train",
        "--cache",
        str(kd.cache),
        "--model",
        str(kd.teacher),
        "--preset",
        "q2a4",
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup",
        "5",
        "--log-every",
        "1",
        "--eval-every",
        "25",
        "--eval-batches",
        "1",
        "--save-every",
        "10",
        "--device",
        "cpu",
    ]


def _saved_step(run: Path) -> int:
    try:
        return json.loads((run / "last" / "trainer_state" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _logged_step(run: Path) -> int:
    rows = RunDir(run).rows()
    return rows[-1]["step"] if rows else -1


def test_resume_after_sigkill_matches_uninterrupted_run(kd, tmp_path):
    run_dir = tmp_path / "killed"
    victim = subprocess.Popen(_train_cmd(kd, run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # kill it between two saves: after the first checkpoint, once a couple more steps were logged
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        saved = _saved_step(run_dir)
        if 10 <= saved < STEPS and _logged_step(run_dir) >= saved + 2:
            break
        time.sleep(0.005)
    assert victim.poll() is None, f"the run ended before it could be killed: {victim.stderr.read().decode()[-2000:]}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    # the checkpoint a resume will use (last/, or the previous one if the kill hit its replacement)
    ckpt = RunDir(run_dir).resume_checkpoint()
    saved = json.loads((ckpt / "trainer_state" / "state.json").read_text())["step"]
    logged = _logged_step(run_dir)
    assert 10 <= saved <= logged < STEPS  # rows past the checkpoint (usually some) must not be duplicated

    resumed = subprocess.run(
        [sys.executable, "-m", "lutq.cli", "train", "--resume", str(run_dir)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # the uninterrupted reference, in this process (one thread, like the subprocesses)
    cfg = TrainConfig.from_dict({**RunDir(run_dir).read_config()["config"], "out": str(tmp_path / "reference")})
    train(cfg)
    ref_rows, rows = RunDir(cfg.out).rows(), RunDir(run_dir).rows()
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # no duplicates, no gaps
    assert [r["step"] for r in ref_rows] == list(range(STEPS + 1))
    for ref, got in zip(ref_rows, rows, strict=True):
        for key in COMPARED:
            assert ref.get(key) == got.get(key), f"step {ref['step']}: {key} {ref.get(key)} != {got.get(key)}"
    assert [r["step"] for r in read_csv(RunDir(run_dir).csv)] == [str(s) for s in range(STEPS + 1)]
    # the elapsed clock continues across the kill instead of restarting at 0
    assert rows[-1]["elapsed"] >= rows[saved]["elapsed"]
    assert "status: completed" in (run_dir / "summary.md").read_text()
    # the step-0 evaluation's units survive the kill, so the summary pairs the final eval against them
    assert RunDir(run_dir).eval_units() == RunDir(cfg.out).eval_units()
    assert RunDir(run_dir).eval_units()["initial"]["step"] == 0
