"""`lutq bench qat` on a tiny random Qwen3 (CPU): every variant runs a real KD-QAT step; JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lutq.bench.qat import SHAPES, QATBenchConfig, QATStep, bench_qat, build_model, model_flops_per_token
from lutq.core.errors import LutqError


def test_variants_train_and_report() -> None:
    cfg = QATBenchConfig(
        shape="tiny",
        seq_lens=(16,),
        batch=2,
        topk=8,
        steps=1,
        warmup=0,
        device="cpu",
        dtypes=("fp32",),
        grad_ckpt=(False, True),
    )
    res = bench_qat(cfg)
    assert [r.label.split()[2:4] for r in res.rows] == [
        ["materialized", "no-ckpt"],
        ["materialized", "ckpt"],
        ["factored", "no-ckpt"],
        ["factored", "ckpt"],
    ]
    for r in res.rows:
        assert r.batch == 2 and r.seq_len == 16 and r.step_s > 0 and r.mfu is None  # no CPU peak
        assert r.tokens_per_s == pytest.approx(2 * 16 / r.step_s)
        assert r.loss is not None and torch.isfinite(torch.tensor(r.loss))
        assert r.extra["flops_per_step"] > 0


def test_step_updates_only_trainable_scales_and_bf16_runs() -> None:
    runner = QATStep(QATBenchConfig(shape="tiny", batch=2, topk=8, device="cpu", mode="mlp-only").resolved())
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    stats = runner.stats("x", 2, 8, "bf16", warmup=0, steps=2)
    assert stats.loss is not None
    changed = {n for n, p in runner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n and "scale_" in n for n in changed)


def test_find_max_batch_path_runs_real_steps() -> None:
    """On CPU nothing runs out of memory, so the search stops at the upper bound after real probes."""
    cfg = QATBenchConfig(
        shape="tiny",
        seq_lens=(8,),
        topk=4,
        steps=1,
        device="cpu",
        dtypes=("fp32",),
        forwards=("materialized",),
        grad_ckpt=(False,),
        find_max_batch=True,
        max_batch_lo=2,
        max_batch_hi=8,
        max_batch_multiple=4,
    )
    seen = []
    res = bench_qat(cfg, on_probe=lambda label, p: seen.append(p.batch))
    (mb,) = res.max_batch.values()
    assert seen == [2, 8] and mb.max_batch == 8 and mb.hit_upper_bound
    assert res.rows == [mb.best]


def test_profile_and_compile_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile appends one ops table per configuration; --compile compiles every decoder layer (eager backend
    here: inductor takes minutes on CPU, the wiring is the same) and the loss matches the eager step's."""
    real_compile, compiled = torch.compile, []

    def eager_compile(fn, **kw):
        compiled.append(type(getattr(fn, "__self__", fn)).__name__)
        return real_compile(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    path = tmp_path / "profile.txt"
    base = dict(
        shape="tiny",
        seq_lens=(8, 16),
        batch=2,
        topk=4,
        steps=1,
        warmup=0,
        device="cpu",
        dtypes=("fp32",),
        forwards=("materialized",),
        grad_ckpt=(False,),
    )
    eager = bench_qat(QATBenchConfig(**base, profile=str(path)))
    text = path.read_text()
    assert text.count("## tiny q2a4 materialized no-ckpt fp32 batch 2 L") == 2 and "aten::mm" in text
    assert "aten ops per step" in text and not compiled
    res = bench_qat(QATBenchConfig(**base, compile=True, profile=str(tmp_path / "p2.txt")))  # same steps taken
    assert compiled == ["Qwen3DecoderLayer"] * SHAPES["tiny"]["num_hidden_layers"]
    assert all(r.label.endswith(" compiled") for r in res.rows)
    assert [r.loss for r in res.rows] == pytest.approx([r.loss for r in eager.rows], rel=1e-5)
    with pytest.raises(LutqError, match="--profile"):
        QATBenchConfig(**{**base, "find_max_batch": True}, profile=str(path)).resolved()


def test_qwen3_06b_shape_and_flops() -> None:
    spec = SHAPES["qwen3-0.6b"]
    assert (
        spec["hidden_size"],
        spec["num_hidden_layers"],
        spec["num_attention_heads"],
        spec["num_key_value_heads"],
        spec["head_dim"],
        spec["intermediate_size"],
        spec["vocab_size"],
    ) == (1024, 28, 16, 8, 128, 3072, 151936)
    with torch.device("meta"):
        model = build_model("qwen3-0.6b", "meta")
    assert model.config.tie_word_embeddings
    linear = 28 * (2 * 3072 * 1024 + 1024 * 3072 + 2048 * 1024 + 2 * 1024 * 1024 + 1024 * 2048)
    assert model_flops_per_token(model, 64, full_vocab=False) == 6 * linear + 12 * 28 * 2048 * 64
    assert model_flops_per_token(model, 64, full_vocab=True) == 6 * (linear + 151936 * 1024) + 12 * 28 * 2048 * 64


def test_bad_config() -> None:
    with pytest.raises(LutqError, match="unknown shape"):
        QATBenchConfig(shape="huge", device="cpu").resolved()
    with pytest.raises(LutqError, match="unknown forward/dtype"):
        QATBenchConfig(shape="tiny", dtypes=("fp8",), device="cpu").resolved()


def test_cli_writes_json(tmp_path: Path) -> None:
    from lutq.cli import app

    out = tmp_path / "b.json"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "qat",
            "--shape",
            "tiny",
            "--seq-len",
            "8",
            "--batch",
            "2",
            "--topk",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--forward",
            "materialized",
            "--grad-ckpt",
            "off",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["bench"] == "qat" and data["device"].startswith("CPU") and "date" in data and "command" in data
    assert len(data["results"]["rows"]) == 1 and data["results"]["rows"][0]["seq_len"] == 8
    # the loss's full-vocabulary terms are part of the timed step, and count the lm_head in the FLOPs
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "qat",
            "--shape",
            "tiny",
            "--seq-len",
            "8",
            "--batch",
            "2",
            "--topk",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--forward",
            "materialized",
            "--grad-ckpt",
            "off",
            "--device",
            "cpu",
            "--full-kl-weight",
            "1",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["results"]["rows"][0]
    assert row["extra"]["flops_per_step"] > data["results"]["rows"][0]["extra"]["flops_per_step"]


def test_cli_delegates_lut_linear_and_pretrain(tmp_path: Path) -> None:
    """`lutq bench lut-linear` / `pretrain` call the quant / pretrain stages' bench functions and write JSON."""
    from lutq.cli import app

    r = CliRunner()
    res = r.invoke(
        app,
        [
            "bench",
            "lut-linear",
            "--out",
            "64",
            "--in",
            "32",
            "--tokens",
            "16",
            "--rank",
            "4",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "l.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["bench"] == "lut-linear" and data["results"]["materialized_ms"] > 0
    res = r.invoke(
        app,
        [
            "bench",
            "pretrain",
            "--seq-len",
            "8",
            "--micro-batch",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "p.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["bench"] == "pretrain" and data["results"]["tokens_per_s"] > 0
