"""The pretraining loop: dry run, logs and checkpoints, exact resume, DDP on CPU, precision, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError
from lutq.data.tokens import prepare_tokens
from lutq.models import load_trainer_state
from lutq.pretrain import PretrainConfig, load_run_config, pretrain
from lutq.pretrain.checkpoint import load_pretrain_checkpoint
from lutq.testing import TINY_PRETRAIN, tiny_tokenizer

SMALL = TINY_PRETRAIN


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_tokenizer().save_pretrained(root / "tok")
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["the", "king", "and", "queen", "rode", "to", "the", "sea", "where", "ships", "sailed", "at", "night"]
    for i in range(30):
        (corpus / f"{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(60)))
    return prepare_tokens(str(root / "tok"), [str(corpus)], root / "data.npy", workers=1).path


def cfg_for(token_file: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(data=str(token_file), out=str(out), **(SMALL | kw))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]


def test_dry_run_prints_the_plan_and_writes_nothing(token_file: Path, tmp_path: Path) -> None:
    result = pretrain(cfg_for(token_file, tmp_path / "run", target_tokens="1K"), run=False)
    assert result["steps"] == 16  # 1000 tokens / (4 sequences x 16 tokens) -> 15.6 -> 16 steps
    assert result["planned_tokens"] == 1024 and result["params"] > 0
    assert not (tmp_path / "run").exists()


def test_run_writes_logs_best_last_and_summary(token_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = pretrain(cfg_for(token_file, run, sample_tokens=8, save_every=4))
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in log)  # CPU: MFU n/a
    assert "eval_loss" in log[2] and "eval_loss" in log[5] and "eval_loss" not in log[3]
    assert log[-1]["loss"] < log[0]["loss"]
    state = load_trainer_state(run / "last")
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * 16
    model, info = load_pretrain_checkpoint(run / "best")
    assert model.config.d_model == 32
    assert info["extra"]["val_loss"] == pytest.approx(min(r["eval_loss"] for r in log if "eval_loss" in r))
    assert (run / "last" / "tokenizer.json").is_file() and (run / "training_log.csv").is_file()
    summary = (run / "summary.md").read_text()
    assert "best validation loss" in summary and "## sample" in summary and result["sample"]["continuation"]
    # the last validation loss comes with its 95 % interval over the evaluation's batches
    low, high = result["last_val_ci"]
    assert low < result["last_val_loss"] < high and result["last_val_loss"] == pytest.approx(log[-1]["eval_loss"])
    assert f"[{low:.4f}, {high:.4f}] (95% CI over" in summary
    assert load_run_config(run).variant == "baseline"
    with pytest.raises(LutqError, match="already holds a run"):
        pretrain(cfg_for(token_file, run))


def test_resume_after_interruption_is_exact(token_file: Path, tmp_path: Path) -> None:
    opts = {"variant": "gqa", "kv_heads": 1, "n_heads": 2, "null_attn": True}
    full = tmp_path / "full"
    pretrain(cfg_for(token_file, full, **opts))
    part = tmp_path / "part"
    stopped = pretrain(cfg_for(token_file, part, stop_after=4, **opts))
    assert stopped["stopped_early"] and stopped["final_step"] == 4
    assert load_trainer_state(part / "last")["step"] == 4  # last/ is current at the interruption
    with open(part / "train.jsonl", "a") as f:  # a row logged after the save, as a kill could leave
        f.write(json.dumps({"step": 5, "loss": 99.0}) + "\n")
    with pytest.raises(LutqError, match="config differs from run.json in lr"):
        pretrain(cfg_for(token_file, part, lr=1e-3, **opts), resume=True)
    pretrain(cfg_for(token_file, part, **opts), resume=True)
    a, b = rows(full), rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("eval_loss") for r in a] == [r.get("eval_loss") for r in b]
    wa, wb = load_file(full / "last" / "model.safetensors"), load_file(part / "last" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_params_with_lion_keep_norm_gains_trainable(token_file: Path, tmp_path: Path) -> None:
    """The seed's bf16 + Lion run froze LayerNorm gains (updates < half a bf16 ulp at 1.0)."""
    run = tmp_path / "bf16"
    pretrain(
        cfg_for(
            token_file,
            run,
            precision="bf16",
            optimizer="lion",
            lr=2e-4,
            warmup=0,
            steps=3,
            eval_every=0,
            grad_checkpoint=True,
        )
    )
    tensors = load_file(run / "last" / "model.safetensors")
    assert tensors["layers.0.attn.q_proj.weight"].dtype == torch.bfloat16
    gain = tensors["layers.0.attn_norm.weight"]
    assert gain.dtype == torch.float32 and not torch.equal(gain, torch.ones_like(gain))


def test_ddp_on_cpu_matches_one_process(token_file: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks x grad_accum 1 == 1 process x grad_accum 2 (gloo); rank 0 logs alone."""
    single = tmp_path / "single"
    pretrain(cfg_for(token_file, single, steps=3, eval_every=0))
    ddp = tmp_path / "ddp"
    flags = [
        "--data",
        str(token_file),
        "--out",
        str(ddp),
        "--d-model",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--d-ff",
        "64",
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
        "--grad-accum",
        "1",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--lr",
        "1e-2",
        "--eval-every",
        "0",
        "--eval-iters",
        "2",
        "--log-every",
        "1",
        "--save-every",
        "0",
        "--sample-tokens",
        "0",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--run",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # `--` stops torchrun from reading our --run as an abbreviation of its own --run-path
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "--",
            "lutq.cli",
            "pretrain",
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    a, b = rows(single), rows(ddp)
    assert [r["step"] for r in b] == [1, 2, 3]  # one row per step: only rank 0 writes
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["tokens"] == ra["tokens"]


def test_cli_dry_run_resume_and_errors(token_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = [
        "pretrain",
        "--data",
        str(token_file),
        "--d-model",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--d-ff",
        "64",
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
        "--grad-accum",
        "1",
        "--warmup",
        "1",
        "--eval-every",
        "0",
        "--eval-iters",
        "1",
        "--sample-tokens",
        "0",
        "--log-every",
        "1",
        "--variant",
        "decoupled",
        "--sem-dim",
        "8",
        "--geo-dim",
        "8",
        "--attn-dim",
        "16",
    ]
    run = tmp_path / "cli"
    res = runner.invoke(app, [*base, "--out", str(run), "--steps", "4", "--seq-schedule", "8@0,16@2"])
    assert res.exit_code == 0, res.output
    assert not run.exists()  # dry run by default
    res = runner.invoke(
        app, [*base, "--out", str(run), "--steps", "4", "--seq-schedule", "8@0,16@2", "--stop-after", "2", "--run"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pretrain", "--resume", str(run), "--lr", "5", "--run"])  # refused, not ignored
    assert res.exit_code != 0 and "cannot change --lr" in str(res.exception) and "--stop-after" in str(res.exception)
    assert load_trainer_state(run / "last")["step"] == 2
    res = runner.invoke(app, ["pretrain", "--resume", str(run), "--log-every", "1", "--run"])
    assert res.exit_code == 0, res.output
    log = rows(run)
    assert [r["seq_len"] for r in log] == [8, 8, 16, 16]
    assert load_trainer_state(run / "last")["step"] == 4
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--seq-schedule", "16@0,oops"])
    assert res.exit_code != 0 and "oops" in str(res.exception)
    cfg_file = tmp_path / "cfg.json"  # --config gives the base, flags override it
    cfg_file.write_text(
        json.dumps(
            {
                "data": str(token_file),
                "d_model": 32,
                "n_layers": 1,
                "n_heads": 2,
                "seq_len": 16,
                "steps": 3,
                "optimizer": "lion",
                "sample_tokens": 0,
            }
        )
    )
    res = runner.invoke(
        app,
        [
            "pretrain",
            "--config",
            str(cfg_file),
            "--out",
            str(tmp_path / "c"),
            "--steps",
            "2",
            "--micro-batch",
            "1",
            "--grad-accum",
            "1",
            "--eval-iters",
            "1",
            "--run",
        ],
    )
    assert res.exit_code == 0, res.output
    saved = load_run_config(tmp_path / "c")
    assert (saved.steps, saved.optimizer, saved.n_layers, saved.lr) == (2, "lion", 1, 1e-4)


def test_fast_precision_follows_native_bf16(monkeypatch):
    import lutq.models.runtime as runtime
    import lutq.pretrain.train as pretrain_train

    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16-mixed"), (False, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert pretrain_train.resolve_precision("fast", cpu) == expected
    assert pretrain_train.resolve_precision("auto", cpu) == "fp32"
    assert pretrain_train.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="not an automatic precision"):
        runtime.auto_picks_bf16("bf16", cpu)
