"""`lutq quantize`, `lutq convert q4-to-q2 | latent-to-frozen`, `lutq snap` on a tiny model; the bench entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import lut_layers
from lutq.quant.bench import bench_lut_linear
from lutq.testing import tiny_model, tiny_tokenizer


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_quantize_convert_snap_cli(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("llama"), tiny_tokenizer())
    out = _run(
        "quantize",
        "--model",
        str(tmp_path / "fp"),
        "--preset",
        "q4a4",
        "--out",
        str(tmp_path / "q4"),
        "--tighten",
        "1",
        "--lut",
        "kmeans",
        "--summary",
    )
    assert "mlp: 6 layers" in out and "saved" in out
    _, _, info = load_checkpoint(tmp_path / "q4")
    assert info.extra["quantize"]["mlp"]["layers"] == 6
    assert info.quant["config"]["tighten_rounds"] == 1 and info.quant["config"]["mlp"]["lut_kind"] == "kmeans"

    _run("convert", "q4-to-q2", str(tmp_path / "q4"), str(tmp_path / "q2"))
    q2, _, info = load_checkpoint(tmp_path / "q2")
    assert {(la.lut_size, la.rank) for n, la in lut_layers(q2) if ".mlp." in n} == {(4, 32)}
    assert info.extra["converted"]["kind"] == "q4-to-q2"

    out = _run("snap", str(tmp_path / "q2"))  # in place
    assert "max |Δlogit|" in out
    _, _, info = load_checkpoint(tmp_path / "q2")
    assert info.snapped and "rel_logit_error" in info.extra["snap"]

    _run("quantize", "-m", str(tmp_path / "fp"), "-p", "q2a4", "-o", str(tmp_path / "lat"), "--latent")
    out = _run("convert", "latent-to-frozen", str(tmp_path / "lat"), str(tmp_path / "frozen"))
    assert "froze 14 latent layers" in out
    frozen, _, _ = load_checkpoint(tmp_path / "frozen")
    assert {la.mode for _, la in lut_layers(frozen)} == {"frozen"}
    with pytest.raises(LutqError, match="no latent layers"):
        _run("convert", "latent-to-frozen", str(tmp_path / "frozen"), str(tmp_path / "x"))
    with pytest.raises(LutqError, match="not a LUT checkpoint"):
        _run("snap", str(tmp_path / "fp"))
    with pytest.raises(LutqError, match="LUT_SIZE,RANK"):
        _run("convert", "q4-to-q2", str(tmp_path / "q4"), str(tmp_path / "y"), "--mlp", "4")


def test_bench_lut_linear_small() -> None:
    r = bench_lut_linear(48, 32, tokens=16, rank=4, lut_size=4, steps=2)
    assert r["dense_ms"] > 0 and r["materialized_ms"] > 0 and r["factored_ms"] > 0
    assert r["materialized_ratio"] == pytest.approx(r["materialized_ms"] / r["dense_ms"])
    assert "factored_ms" not in bench_lut_linear(48, 32, tokens=16, rank=4, steps=1, factored_steps=0)


def test_quantize_and_convert_device_flag(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=2), tiny_tokenizer())
    _run(
        "quantize",
        "-m",
        str(tmp_path / "fp"),
        "-p",
        "q4a4",
        "-o",
        str(tmp_path / "q4"),
        "--device",
        "auto",
        "--summary",
    )
    _, _, info = load_checkpoint(tmp_path / "q4")
    assert info.extra["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    _run("convert", "q4-to-q2", str(tmp_path / "q4"), str(tmp_path / "q2"), "--device", "cpu")
    with pytest.raises(LutqError, match="unknown device 'gpu0'"):
        _run("quantize", "-m", str(tmp_path / "fp"), "-o", str(tmp_path / "bad"), "--device", "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LutqError, match="device 'cuda': this torch sees no CUDA device"):
            _run("convert", "q4-to-q2", str(tmp_path / "q4"), str(tmp_path / "bad"), "--device", "cuda")
    assert not (tmp_path / "bad").exists()
