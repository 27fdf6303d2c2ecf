"""`lutq cache`, `lutq cache verify`, verify_cache and bench_cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import sha256_file
from lutq.core.errors import LutqError
from lutq.kd import bench_cache, verify_cache
from lutq.kd.shards import open_shard, write_shard


def _tamper(cache_dir, delta=0.5, array="topk_logits"):
    """Shift one stored value and re-sign the shard, so only the teacher check can notice."""
    shard = cache_dir / "train-00000.safetensors"
    arrays = {k: np.array(v) for k, v in open_shard(shard).items()}
    if array == "topk_logits":
        arrays["topk_logits"][0, 3, 0] += np.float16(delta)
    else:
        arrays[array][0, 3] += np.float32(delta)
    write_shard(shard, arrays)
    meta = json.loads((cache_dir / "meta.json").read_text())
    meta["shards"]["train"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (cache_dir / "meta.json").write_text(json.dumps(meta))


def test_verify_passes_then_catches_a_wrong_logit(kd_cache, kd_teacher, tmp_path):
    report = verify_cache(kd_cache, n=4, teacher=kd_teacher)
    assert report["ok"] and report["positions"] == 4 * 31 and report["top1_match"] == 1.0
    assert report["sequences"] == {"train": [0, 9, 18], "val": [0]} and report["max_abs_diff"] < 1e-2
    assert report["lse_max_abs_diff"] < 1e-3
    bad = tmp_path / "bad"
    shutil.copytree(kd_cache, bad)
    _tamper(bad)
    report = verify_cache(bad, n=4, teacher=kd_teacher)
    assert not report["ok"] and report["max_abs_diff"] > 0.4
    bad_lse = tmp_path / "bad-lse"
    shutil.copytree(kd_cache, bad_lse)
    _tamper(bad_lse, array="teacher_lse")
    report = verify_cache(bad_lse, n=4, teacher=kd_teacher)
    assert not report["ok"] and report["lse_max_abs_diff"] > 0.4 and report["max_abs_diff"] < 1e-2


def test_cli_builds_and_verifies(kd_dir, kd_cache, tmp_path):
    out = tmp_path / "cli-cache"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "cache",
            "--model",
            str(kd_dir / "teacher"),
            "--source",
            str(kd_dir / "chat.jsonl"),
            "-L",
            "32",
            "-K",
            "8",
            "-R",
            "4",
            "--sequences",
            "20",
            "--batch-size",
            "4",
            "--shard-size",
            "6",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "bytes/token: " in res.output and "tokens/s: " in res.output
    for f in ("meta.json", "val-00000.safetensors"):
        assert (out / f).read_bytes() == (kd_cache / f).read_bytes()
    res = runner.invoke(app, ["cache", "verify", str(out), "-n", "2"])
    assert res.exit_code == 0, res.output
    assert '"ok": true' in res.output
    _tamper(out)
    res = runner.invoke(app, ["cache", "verify", str(out)])
    assert res.exit_code != 0 and "differ from the teacher" in str(res.exception)


def test_cli_val_blocks_per_doc(kd_dir, tmp_path):
    out = tmp_path / "spread"
    args = ["cache", "--model", str(kd_dir / "teacher"), "--source", str(kd_dir / "chat.jsonl"), "-L", "32"]
    args += ["-K", "8", "--sequences", "40", "--val-fraction", "0.2", "--val-blocks-per-doc", "1", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["val_blocks_per_document"] == 1
    assert meta["document_starts"]["val"] == list(range(meta["sequences"]["val"]))  # one sequence per conversation


def test_cli_help_lists_verify():
    res = CliRunner().invoke(app, ["cache", "--help"])
    assert res.exit_code == 0 and "verify" in res.output and "--thinking" in res.output


def test_bench_cache_reports_both_rates(kd_teacher):
    model, _ = kd_teacher
    r = bench_cache(model, L=32, K=8, batch=2, n_batches=2, R=2)
    assert r["tokens"] == 2 * 2 * 32
    assert r["bare_tokens_per_s"] > 0 and r["cache_tokens_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["cache_tokens_per_s"] / r["bare_tokens_per_s"])
    assert r["overhead"] > 0 and r["ratio_from_overhead"] == pytest.approx(1 / (1 + r["overhead"]))
    assert r["bytes_per_token"] == pytest.approx((32 * 4 + 31 * ((8 + 2) * 6 + 4)) / 32)  # + teacher_lse fp32
    shaped = bench_cache("shape:tiny", L=16, K=4, batch=2, n_batches=1, device="cpu", dtype="bf16")
    assert shaped["dtype"] == "bfloat16" and shaped["tokens"] == 32 and shaped["cache_tokens_per_s"] > 0
    with pytest.raises(LutqError, match="unknown shape 'huge'"):
        bench_cache("shape:huge", device="cpu")
