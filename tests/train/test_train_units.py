"""Unit tests of the trainer's pieces that need no model: config, schedule, run directory, RNG state,
loggers, plot."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from lutq.core.errors import LutqError
from lutq.train.config import TrainConfig
from lutq.train.loggers import Trackers
from lutq.train.plot import plot_runs
from lutq.train.run_dir import RunDir, csv_columns, ppl_name, read_csv
from lutq.train.schedule import lr_factor, make_scheduler
from lutq.train.state import rng_state, set_rng_state


def test_config_validation_names_the_field(tmp_path):
    TrainConfig(cache=tmp_path, out=tmp_path / "run").validate()
    with pytest.raises(LutqError, match="mode"):
        TrainConfig(mode="everything").validate()
    with pytest.raises(LutqError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(LutqError, match="logger"):
        TrainConfig(loggers=("mlflow",)).validate()
    with pytest.raises(LutqError, match="either --init"):
        TrainConfig(model="m", init=tmp_path).validate()
    with pytest.raises(LutqError, match="unknown key"):
        TrainConfig.from_dict({"stepz": 3})
    cfg = TrainConfig.from_dict({"ppl_texts": ["shakespeare:val"], "lr": 1, "out": "x"})
    assert cfg.ppl_texts == ("shakespeare:val",) and cfg.lr == 1.0 and cfg.out.name == "x"
    # the default lr follows what trains: the scales, or the latent weights (scale units)
    assert TrainConfig().peak_lr == 1e-4 and TrainConfig(latent=True).peak_lr == 2e-3
    assert TrainConfig(latent=True, lr=5e-4).peak_lr == 5e-4
    with pytest.raises(LutqError, match="lr must be > 0"):
        TrainConfig(lr=0.0).validate()


def test_schedule_warmup_cosine_floor():
    total, warmup, floor = 111, 10, 0.1
    f = [lr_factor(s, total=total, warmup=warmup, min_ratio=floor) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup, step 0 trains
    assert all(a < b for a, b in itertools.pairwise(f[:10]))
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # monotone decay after warmup
    assert f[total - 1] == pytest.approx(floor) and f[-1] == pytest.approx(floor)
    mid = warmup + (total - 1 - warmup) // 2
    assert f[mid] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-2)
    # LambdaLR drives the optimizer with the same numbers, one scheduler step per optimizer step
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = make_scheduler(opt, total=total, warmup=warmup, min_ratio=floor)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * x for x in f[:total]])
    # warmup longer than the run is clipped: the last step still reaches the peak
    assert make_scheduler(torch.optim.SGD([p], lr=1.0), total=3, warmup=100, min_ratio=0).get_last_lr()[0] > 0


def test_run_dir_logs_and_truncate(tmp_path):
    run = RunDir(tmp_path / "run")
    cols = csv_columns([ppl_name("shakespeare:val")])
    assert cols[:3] == ["step", "tokens", "loss"] and "eval_ppl_shakespeare_val" in cols
    for name in ("eval_kd", "eval_kl", "eval_top1_agree", "lr", "grad_norm", "tokens_per_s", "elapsed", "kd", "ce"):
        assert name in cols
    run.start_logs(cols)
    for s in range(1, 6):
        run.log({"step": s, "tokens": 10 * s, "loss": 1.0 / s, "lr": 0.1, "extra": "only-jsonl"})
    rows = read_csv(run.csv)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and rows[0]["eval_kd"] == ""
    assert list(rows[0]) == cols
    with run.jsonl.open("a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a kill
    assert [r["step"] for r in run.rows()] == [1, 2, 3, 4, 5]
    RunDir(run.path).truncate(3)  # a fresh object (a resumed process) reads the header back
    assert [r["step"] for r in run.rows()] == [1, 2, 3]
    assert [int(r["step"]) for r in read_csv(run.csv)] == [1, 2, 3]
    assert run.rows()[0]["extra"] == "only-jsonl"


def test_run_dir_resume_checkpoint_fallbacks(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(LutqError, match="nothing to resume"):
        run.resume_checkpoint()
    # a kill between "move last/ aside" and "move the new one in" leaves .last.old-PID
    old = tmp_path / ".last.old-123"
    (old / "trainer_state").mkdir(parents=True)
    (old / "trainer_state" / "state.pt").write_bytes(b"x")
    (tmp_path / ".last.abc.tmp").mkdir()
    assert run.resume_checkpoint() == old
    assert not (tmp_path / ".last.abc.tmp").exists()
    (run.last / "trainer_state").mkdir(parents=True)
    (run.last / "trainer_state" / "state.pt").write_bytes(b"x")
    assert run.resume_checkpoint() == run.last
    with pytest.raises(LutqError, match="not a training run"):
        RunDir(tmp_path / "nope").read_config()


def test_rng_state_round_trip(tmp_path):
    from lutq.models import load_trainer_state, save_trainer_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_trainer_state(tmp_path, {"rng": rng_state()})  # must load back with weights_only=True
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_trainer_state(tmp_path)["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_loggers_are_optional_and_lazy(tmp_path):
    none = Trackers((), run_dir=tmp_path, project="p", config={})
    none.log({"loss": 1.0}, 1)
    none.close()
    with pytest.raises(LutqError, match="unknown logger"):
        Trackers(("mlflow",), run_dir=tmp_path, project="p", config={})
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(LutqError, match=r"pip install 'lutq\[tensorboard\]'"):
            Trackers(("tensorboard",), run_dir=tmp_path, project="p", config={})
        return
    tb = Trackers(("tensorboard",), run_dir=tmp_path, project="p", config={})
    tb.log({"step": 1, "loss": 1.0, "eval_kd": 2.0}, 1)
    tb.close()
    assert list((tmp_path / "tensorboard").iterdir())


def test_plot_writes_png(tmp_path):
    runs = []
    for i in range(2):
        run = RunDir(tmp_path / f"run{i}")
        run.start_logs(csv_columns())
        run.log({"step": 0, "eval_loss": 3.0 + i})
        for s in range(1, 11):
            run.log({"step": s, "loss": 3.0 / s + i, **({"eval_loss": 2.0 + i} if s % 5 == 0 else {})})
        runs.append(run.path)
    out = plot_runs(runs, tmp_path / "plots" / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(LutqError, match="missing"):
        plot_runs([tmp_path / "nope"], tmp_path / "x.png")
    empty = RunDir(tmp_path / "empty")
    empty.start_logs(csv_columns())
    with pytest.raises(LutqError, match="no 'loss'"):
        plot_runs([empty.path], tmp_path / "x.png")
    assert json.loads(json.dumps(RunDir(runs[0]).rows()[0]))["step"] == 0


class _FakeTracker:
    """Stands in for the wandb / trackio module: records init, log and finish calls."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, metrics, step):
        self.calls.append(("log", metrics, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_trackers_forward_numeric_metrics(tmp_path, monkeypatch, name):
    import sys

    fake = _FakeTracker()
    monkeypatch.setitem(sys.modules, name, fake)
    t = Trackers((name,), run_dir=tmp_path / "myrun", project="proj", config={"lr": 1.0}, resume=True)
    t.log({"step": 3, "loss": 1.5, "eval_kd": 0.25, "tokens": 96, "note": "x", "flag": True}, 3)
    t.close()
    init = fake.calls[0][1]
    assert init["project"] == "proj" and init["name"] == "myrun" and init["config"] == {"lr": 1.0}
    assert init["resume"] == "allow"
    assert fake.calls[1] == ("log", {"train/loss": 1.5, "eval/kd": 0.25, "train/tokens": 96.0}, 3)
    assert fake.calls[2] == ("finish",)
