"""`lutq train` / `lutq plot` through the CLI (in process), and the progressive q4a4 → q2a4 recipe."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError
from lutq.models import load_checkpoint, load_trainer_state
from lutq.quant import lut_layers
from lutq.train import ProgressiveConfig, RunDir, progressive

runner = CliRunner()


def test_help_texts():
    for cmd in ("train", "plot"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "--out" in res.output
    assert "--resume" in runner.invoke(app, ["train", "--help"]).output


def test_cli_train_resume_extends_and_plot(kd, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--cache",
        str(kd.cache),
        "--model",
        str(kd.teacher),
        "--preset",
        "q4a4",
        "--out",
        str(run),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--save-every",
        "3",
        "--device",
        "cpu",
        "--temperature",
        "1.5",
        "--hard-top1-weight",
        "0",
        "--label-ce-weight",
        "0.3",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = RunDir(run).read_config()["config"]
    assert cfg["kd"]["temperature"] == 1.5 and cfg["kd"]["hard_top1_weight"] == 0 and cfg["preset"] == "q4a4"
    assert cfg["kd"]["label_ce_weight"] == 0.3
    assert all("label_ce" in r for r in RunDir(run).rows() if "loss" in r)  # logged with the other components
    # --resume with a flag overrides the saved config: train 2 more steps
    res = runner.invoke(app, ["train", "--resume", str(run), "--steps", "5"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in RunDir(run).rows()] == [0, 1, 2, 3, 4, 5]
    assert load_trainer_state(run / "last")["step"] == 5
    assert RunDir(run).read_config()["config"]["steps"] == 3  # run.json keeps what the run started with
    res = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "loss.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # bad usage: clear errors
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, LutqError) and "--cache" in str(res.exception)
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "nope")])
    assert isinstance(res.exception, LutqError) and "not a training run" in str(res.exception)
    res = runner.invoke(app, [*args[:-4], "--mode", "everything"])
    assert isinstance(res.exception, LutqError) and "unknown mode" in str(res.exception)


def test_cli_full_kl_weight_and_a_cache_without_teacher_lse(kd, tmp_path):
    import json
    import shutil

    args = [
        "train",
        "--model",
        str(kd.teacher),
        "--preset",
        "q4a4",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
        "--full-kl-weight",
        "0.5",
        "--kd-weight",
        "0.5",
    ]
    res = runner.invoke(app, [*args, "--cache", str(kd.cache), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    kd_cfg = RunDir(tmp_path / "run").read_config()["config"]["kd"]
    assert kd_cfg["full_kl_weight"] == 0.5 and kd_cfg["kd_weight"] == 0.5
    rows = RunDir(tmp_path / "run").rows()
    assert all(r["full_kl"] > 0 for r in rows if "loss" in r) and any("eval_full_kl" in r for r in rows)
    # a cache built before teacher_lse was stored: a clear error naming the cache, before any run dir is made
    old = tmp_path / "old-cache"
    shutil.copytree(kd.cache, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["arrays"]["teacher_lse"]
    (old / "meta.json").write_text(json.dumps(meta))
    res = runner.invoke(app, [*args, "--cache", str(old), "--out", str(tmp_path / "run2")])
    assert isinstance(res.exception, LutqError) and str(old) in str(res.exception)
    assert "teacher_lse" in str(res.exception) or "log-sum-exp" in str(res.exception)
    assert not (tmp_path / "run2").exists()


def test_progressive_recipe_q4_to_q2(kd, tmp_path):
    base = kd.config(tmp_path / "unused", eval_every=1000, eval_batches=1)
    cfg = ProgressiveConfig(
        out=tmp_path / "recipe",
        base=base,
        q4_steps=3,
        q2_mlp_steps=4,
        q2_all_steps=4,
        q4_lr=1e-3,
        q2_mlp_lr=3e-3,
        q2_all_lr=3e-3,
    )
    res = progressive(cfg)
    assert set(res.stages) == {"q4a4", "convert", "q2a4_mlp", "q2a4_all"}
    q4, _, _ = load_checkpoint(res.stages["q4a4"].checkpoint, load_tokenizer=False)
    assert {layer.lut_size for _, layer in lut_layers(q4)} == {16}
    q2, _, info = load_checkpoint(res.stages["convert"], load_tokenizer=False)
    sizes = {name.rsplit(".", 1)[1]: (layer.lut_size, layer.rank) for name, layer in lut_layers(q2)}
    assert sizes["gate_proj"] == (4, 32) and sizes["q_proj"] == (16, 8)
    assert info.extra["converted"]["kind"] == "q4-to-q2"
    mlp_run = RunDir(res.stages["q2a4_mlp"].run_dir).read_config()["config"]
    all_run = RunDir(res.stages["q2a4_all"].run_dir).read_config()["config"]
    assert mlp_run["mode"] == "mlp-only" and mlp_run["init"] == str(res.stages["convert"])
    assert all_run["mode"] == "all" and all_run["init"] == str(res.stages["q2a4_mlp"].checkpoint)
    assert res.final.is_dir() and res.stages["q2a4_all"].step == 4
    # each stage starts from the previous stage's best checkpoint: same validation numbers at step 0
    mlp = res.stages["q2a4_mlp"]
    assert RunDir(res.stages["q2a4_all"].run_dir).rows()[0]["eval_loss"] == mlp.best_eval_loss
    assert RunDir(res.stages["q4a4"].run_dir).rows()[-1]["step"] == 3
    # running it again continues (here: finds every stage finished) instead of starting over
    again = progressive(cfg)
    assert again.stages["q2a4_all"].step == 4
    assert [r["step"] for r in RunDir(again.stages["q4a4"].run_dir).rows()] == [0, 1, 2, 3]
    with pytest.raises(LutqError, match="base.init"):
        progressive(ProgressiveConfig(out=tmp_path / "r2", base=base.replace(init=tmp_path)))
