"""Audit of the KD-QAT trainer: resume with changed flags, a finished run resumed, an extension that was
killed, optional loggers checked before any work, logged speed, and CSV columns added on resume."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError
from lutq.models import load_trainer_state
from lutq.train import RunDir, train
from lutq.train.run_dir import read_csv
from lutq.train.schedule import lr_factor

runner = CliRunner()


def test_missing_logger_fails_before_the_student_is_built(kd, tmp_path, monkeypatch):
    import lutq.train.trainer as trainer

    def no_build(*args, **kwargs):
        raise AssertionError("the student was built before the logger was checked")

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(trainer, "build_student", no_build)
    with pytest.raises(LutqError, match=r"logger 'wandb' needs its package: pip install 'lutq\[wandb\]'"):
        train(kd.config(tmp_path / "run", loggers=["wandb"]))
    assert not (tmp_path / "run").exists()  # nothing half-made: the same command works once it is installed


def test_resume_applies_a_changed_lr_and_weight_decay(kd, tmp_path):
    cfg = kd.config(tmp_path / "run", steps=4, save_every=2)
    train(cfg)
    # extend to 6 steps at half the peak lr with weight decay: the new schedule from the first resumed step on
    train(cfg.replace(steps=6, lr=5e-3, weight_decay=0.1), resume=True)
    rows = {r["step"]: r for r in RunDir(cfg.out).rows()}
    for step in (5, 6):
        assert rows[step]["lr"] == pytest.approx(5e-3 * lr_factor(step - 1, total=6, warmup=1, min_ratio=0.1))
    groups = load_trainer_state(cfg.out / "last")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1]


def test_resume_of_an_unchanged_run_stays_exact(kd, tmp_path, monkeypatch):
    # a guard: re-applying lr / weight decay after loading the state must not move an unchanged run by one bit
    import lutq.train.trainer as trainer

    ref = kd.config(tmp_path / "ref", steps=6)
    train(ref)
    cut = kd.config(tmp_path / "cut", steps=6, save_every=3)
    real, calls = trainer.project_luts_, {"n": 0}

    def killed_at_step_4(model):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(model)

    monkeypatch.setattr(trainer, "project_luts_", killed_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(cut)
    monkeypatch.setattr(trainer, "project_luts_", real)
    train(cut, resume=True)
    got, want = RunDir(cut.out).rows(), RunDir(ref.out).rows()
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want, strict=True):
        assert (a["loss"], a["lr"], a["grad_norm"], a["tokens"]) == (b["loss"], b["lr"], b["grad_norm"], b["tokens"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "g-only"}, "mode"),
        ({"train_lut": True}, "train_lut"),
        ({"latent": True}, "latent"),
        ({"preset": "q4a4"}, "preset"),
        ({"seed": 1}, "seed"),
        ({"batch_size": 2}, "batch_size"),
        ({"grad_accum": 2}, "grad_accum"),
    ],
)
def test_resume_refuses_flags_that_cannot_change(kd, tmp_path, change, field):
    cfg = kd.config(tmp_path / "run", steps=2, save_every=1)
    train(cfg)
    before = RunDir(cfg.out).jsonl.read_text()
    with pytest.raises(LutqError, match=rf"{cfg.out}: cannot resume with {field} changed .*--init {cfg.out}/last"):
        train(cfg.replace(steps=4, **change), resume=True)
    assert RunDir(cfg.out).jsonl.read_text() == before
    assert load_trainer_state(cfg.out / "last")["step"] == 2


def test_resume_refuses_init_and_overwrite(kd, tmp_path):
    cfg = kd.config(tmp_path / "run", steps=2, save_every=1)
    train(cfg)
    with pytest.raises(LutqError, match="cannot resume with init changed"):
        train(dataclasses.replace(cfg, steps=4, model=None, init=cfg.out / "last"), resume=True)
    with pytest.raises(LutqError, match="--overwrite"):
        train(cfg.replace(steps=4), resume=True, overwrite=True)
    # the CLI: a --config file given with --resume was silently dropped
    toml = tmp_path / "c.toml"
    toml.write_text("steps = 9\n")
    res = runner.invoke(app, ["train", "--resume", str(cfg.out), "--config", str(toml)])
    assert isinstance(res.exception, LutqError) and "--config" in str(res.exception)
    assert load_trainer_state(cfg.out / "last")["step"] == 2


def test_resume_accepts_another_spelling_of_the_same_model_path(kd, tmp_path, monkeypatch):
    # the speedrun rebuilds the config on every invocation: a relative and an absolute path to the same teacher
    # (another working directory, `--run-dir` spelled differently) are the same model, not a changed one
    monkeypatch.chdir(kd.root)
    cfg = kd.config(tmp_path / "run", steps=2, save_every=1, model="teacher")
    train(cfg)
    train(cfg.replace(steps=3, model=str(kd.teacher.resolve())), resume=True)
    assert load_trainer_state(cfg.out / "last")["step"] == 3
    with pytest.raises(LutqError, match="cannot resume with model changed"):  # another existing model is refused
        train(cfg.replace(steps=4, model=str(kd.cache)), resume=True)


def test_resume_of_a_finished_run_changes_nothing(kd, tmp_path):
    cfg = kd.config(tmp_path / "run", steps=3, eval_every=3, eval_batches=1)
    first = train(cfg)
    run = RunDir(cfg.out)
    files = {p: p.read_bytes() for p in (run.summary, run.jsonl, run.csv)}
    again = train(cfg, resume=True)  # what lutq speedrun / the progressive recipe do with a finished stage
    assert again.step == 3 and again.final_train_loss == first.final_train_loss
    assert again.best_step == first.best_step and again.best_eval_loss == first.best_eval_loss
    assert again.final_eval == first.final_eval and again.tokens == first.tokens
    assert {p: p.read_bytes() for p in files} == files  # summary.md keeps its final train loss
    # fewer steps than the run already made: refused, not "completed" at 3/2
    with pytest.raises(LutqError, match=r"--steps 2 .* step 3"):
        train(cfg.replace(steps=2), resume=True)


def test_cli_resume_after_a_killed_extension_finishes_the_extension(kd, tmp_path, monkeypatch):
    import lutq.train.trainer as trainer

    run = tmp_path / "run"
    fresh = [
        "train", "--cache", str(kd.cache), "--model", str(kd.teacher), "--preset", "q2a4", "--out", str(run),
        "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup", "1", "--log-every", "1",
        "--eval-batches", "0", "--save-every", "1", "--device", "cpu", "--init-lut", "uniform",
        "--init-tighten", "0", "--init-calib-sequences", "0",
    ]  # fmt: skip
    assert runner.invoke(app, fresh).exit_code == 0
    real, calls = trainer.project_luts_, {"n": 0}

    def killed_at_step_5(model):  # runs right after each optimizer step: a kill after step 4 was saved
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(model)

    monkeypatch.setattr(trainer, "project_luts_", killed_at_step_5)
    res = runner.invoke(app, ["train", "--resume", str(run), "--steps", "6"])
    assert isinstance(res.exception, RuntimeError) and str(res.exception) == "killed"
    assert load_trainer_state(run / "last")["step"] == 4
    monkeypatch.setattr(trainer, "project_luts_", real)
    res = runner.invoke(app, ["train", "--resume", str(run)])  # the same command as after any kill
    assert res.exit_code == 0, res.output
    assert load_trainer_state(run / "last")["step"] == 6
    assert [r["step"] for r in RunDir(run).rows()] == [1, 2, 3, 4, 5, 6]
    assert "steps: 6/6" in (run / "summary.md").read_text()


def test_tokens_per_s_does_not_count_evaluation_time(kd, tmp_path, monkeypatch):
    import time as real_time

    import lutq.train.trainer as trainer

    clock = {"offset": 0.0}

    class FakeTime:
        @staticmethod
        def time():
            return real_time.time() + clock["offset"]

        strftime = staticmethod(real_time.strftime)

    real_eval = trainer.evaluate_student

    def slow_eval(*args, **kwargs):  # a 100 s evaluation, on the trainer's clock
        clock["offset"] += 100.0
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", FakeTime)
    monkeypatch.setattr(trainer, "evaluate_student", slow_eval)
    train(kd.config(tmp_path / "run", steps=4, eval_every=2, eval_batches=1))
    rows = {r["step"]: r for r in RunDir(tmp_path / "run").rows()}
    per_step = 4 * 32
    # step 3 came right after the evaluation at step 2: its speed is a training speed, not 128 tokens / 100 s
    assert rows[3]["tokens_per_s"] > 20 * per_step / 100.0
    assert rows[4]["elapsed"] > 200.0  # elapsed is wall time, evaluations included (step 0 and step 2)


def test_resume_with_a_new_ppl_text_adds_its_csv_column(kd, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("a jolly wizard bakes seven brown loaves while the lazy fox sleeps over the quartz\n" * 6)
    cfg = kd.config(tmp_path / "run", steps=2, save_every=2, eval_every=2, eval_batches=1)
    train(cfg)
    train(cfg.replace(steps=4, ppl_texts=(str(text),), ppl_max_tokens=200, ppl_max_length=64), resume=True)
    rows = read_csv(RunDir(cfg.out).csv)
    assert "eval_ppl_held" in rows[0]
    assert [r["step"] for r in rows if r["eval_ppl_held"]] == ["4"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert json.loads(RunDir(cfg.out).jsonl.read_text().splitlines()[-1])["eval_ppl_held"] > 1


def test_resume_keeps_a_best_saved_after_the_last_checkpoint(kd, tmp_path, monkeypatch):
    import lutq.train.trainer as trainer

    scripted = {0: 5.0, 2: 4.0, 4: 2.0, 6: 3.0}  # validation loss by step: the best is step 4
    at = {"step": 0}

    def fake_eval(*args, **kwargs):
        return {"eval_loss": scripted[at["step"]]}

    real_project, kill = trainer.project_luts_, {"at": 5}

    def count_steps(model):
        at["step"] += 1
        if at["step"] == kill["at"]:  # killed during step 5: last/ is step 3, best/ is step 4
            raise RuntimeError("killed")
        return real_project(model)

    monkeypatch.setattr(trainer, "evaluate_student", fake_eval)
    monkeypatch.setattr(trainer, "project_luts_", count_steps)
    cfg = kd.config(tmp_path / "run", steps=6, eval_every=2, eval_batches=1, save_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    at["step"], kill["at"] = 3, None
    res = train(cfg.replace(eval_every=6), resume=True)  # evaluates at step 6 only (3.0: worse than step 4)
    info = json.loads((cfg.out / "best" / "config.json").read_text())["extra"]["train"]
    assert info["step"] == 4 and res.best_step == 4 and res.best_eval_loss == 2.0
    assert "best validation loss: 2.0000 at step 4" in (cfg.out / "summary.md").read_text()


def test_plot_labels_runs_that_share_a_directory_name(tmp_path, monkeypatch):
    import matplotlib.axes

    from lutq.train.plot import plot_runs
    from lutq.train.run_dir import csv_columns

    labels = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    runs = []
    for stage in ("q4a4", "q2a4"):  # the speedrun's layout: STAGE/out
        run = RunDir(tmp_path / stage / "out")
        run.start_logs(csv_columns())
        for s in range(1, 4):
            run.log({"step": s, "loss": 1.0 / s})
        runs.append(run.path)
    plot_runs(runs, tmp_path / "loss.png")
    assert labels == ["q4a4/out train", "q2a4/out train"]
    labels.clear()
    monkeypatch.chdir(runs[0])
    plot_runs(["."], tmp_path / "one.png")
    assert labels == ["out train"]


def test_a_run_from_init_records_the_students_own_preset(kd, tmp_path):
    # summary.md and the checkpoints said "(q2a4)", TrainConfig.preset's default, for a q4a4 --init student
    first = kd.config(tmp_path / "q4", steps=1, preset="q4a4")
    train(first)
    cfg = dataclasses.replace(kd.config(tmp_path / "run", steps=1), model=None, init=first.out / "last")
    assert cfg.preset == "q2a4"
    train(cfg)
    assert "/last (q4a4), mode all" in (cfg.out / "summary.md").read_text()
    extra = json.loads((cfg.out / "last" / "config.json").read_text())["extra"]["train"]
    assert extra["preset"] == "q4a4"


def test_resume_after_the_init_checkpoint_moved(kd, tmp_path):
    # --init names a path that is gone (the run was moved with its inputs): the weights come from last/, so the
    # resume goes on with the new spelling; another existing checkpoint is still refused
    first = kd.config(tmp_path / "a", steps=1)
    train(first)
    cfg = dataclasses.replace(kd.config(tmp_path / "run", steps=1, save_every=1), model=None, init=first.out / "last")
    train(cfg)
    (tmp_path / "a").rename(tmp_path / "a-moved")
    train(cfg.replace(steps=2, init=tmp_path / "a-moved" / "last"), resume=True)
    assert load_trainer_state(cfg.out / "last")["step"] == 2
    with pytest.raises(LutqError, match="cannot resume with init changed"):
        train(cfg.replace(steps=3, init=cfg.out / "last"), resume=True)
