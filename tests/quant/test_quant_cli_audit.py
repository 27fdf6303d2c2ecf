"""Audit of `lutq quantize`, `lutq convert`, `lutq snap`: OUT handling, non-q4 input, broken weights, reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import lut_layers
from lutq.quant.api import QuantReport, QuantRow, quantize_checkpoint
from lutq.testing import tiny_cache, tiny_model, tiny_tokenizer


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp/ (a 1-layer Llama), q4/ (q4a4), q2/ (q4 converted), latent/ (q2a4, latent): treat as read-only."""
    root = tmp_path_factory.mktemp("quant-audit")
    save_checkpoint(root / "fp", tiny_model("llama", layers=1), tiny_tokenizer())
    _run("quantize", "-m", str(root / "fp"), "-p", "q4a4", "-o", str(root / "q4"), "--summary")
    _run("convert", "q4-to-q2", str(root / "q4"), str(root / "q2"))
    _run("quantize", "-m", str(root / "fp"), "-p", "q2a4", "-o", str(root / "latent"), "--latent", "--summary")
    return root


def _commands(ckpts: Path, out: Path) -> dict[str, list[str]]:
    return {
        "quantize": ["quantize", "-m", str(ckpts / "fp"), "-p", "q4a4", "-o", str(out), "--summary"],
        "q4-to-q2": ["convert", "q4-to-q2", str(ckpts / "q4"), str(out)],
        "latent-to-frozen": ["convert", "latent-to-frozen", str(ckpts / "latent"), str(out)],
        "snap": ["snap", str(ckpts / "q2"), str(out)],
    }


@pytest.mark.parametrize("command", ["quantize", "q4-to-q2", "latent-to-frozen", "snap"])
def test_out_that_is_not_a_checkpoint_is_never_replaced(ckpts, tmp_path, command):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("precious")
    with pytest.raises(LutqError, match=r"data: exists, is not empty and is not a lutq checkpoint"):
        _run(*_commands(ckpts, data)[command])
    assert (data / "notes.txt").read_text() == "precious"
    with pytest.raises(LutqError, match=r"notes.txt: exists and is not a directory"):
        _run(*_commands(ckpts, data / "notes.txt")[command])
    # a directory holding the input would be replaced with it
    with pytest.raises(LutqError, match=r"holds the input"):
        _run(*_commands(ckpts, ckpts)[command])
    assert (ckpts / "fp" / "config.json").is_file()
    # new, empty, or a previous lutq checkpoint: written (atomically)
    (tmp_path / "empty").mkdir()
    _run(*_commands(ckpts, tmp_path / "empty")[command])
    _run(*_commands(ckpts, tmp_path / "empty")[command])
    assert load_checkpoint(tmp_path / "empty")[2].quant is not None


def test_convert_refuses_a_checkpoint_that_is_not_q4(ckpts, tmp_path):
    with pytest.raises(LutqError, match=r"already at the targets.*nothing to convert"):
        _run("convert", "q4-to-q2", str(ckpts / "q2"), str(tmp_path / "again"))
    with pytest.raises(LutqError, match=r"model.layers.0.mlp.gate_proj has a 16-entry LUT.*cannot grow it to 32"):
        _run("convert", "q4-to-q2", str(ckpts / "q4"), str(tmp_path / "grow"), "--mlp", "32,4")
    assert not (tmp_path / "again").exists() and not (tmp_path / "grow").exists()
    with pytest.raises(LutqError, match="not a LUT checkpoint"):
        _run("convert", "q4-to-q2", str(ckpts / "fp"), str(tmp_path / "fp2"))


def test_non_finite_weights_are_named_and_nothing_is_written(tmp_path):
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    save_checkpoint(tmp_path / "nan", model, tiny_tokenizer())
    with pytest.raises(LutqError, match=r"model.layers.0.mlp.up_proj: the weight has 1 non-finite value"):
        quantize_checkpoint(str(tmp_path / "nan"), tmp_path / "q", "q4a4", show_progress=False)
    assert not (tmp_path / "q").exists()


def test_report_flags_suspicious_layers():
    rows = [
        QuantRow("a.mlp.up_proj", "mlp", (4, 4), 4, 2, "uniform", 0.3),
        QuantRow("b.mlp.up_proj", "mlp", (4, 4), 4, 2, "uniform", math.nan),
        QuantRow("c.mlp.up_proj", "mlp", (4, 4), 4, 2, "uniform", 1.7),
        QuantRow("d.mlp.up_proj", "mlp", (4, 4), 4, 2, "uniform", None),
    ]
    report = QuantReport(rows)
    assert report.flagged() == ["b.mlp.up_proj", "c.mlp.up_proj"]
    console = Console(record=True, width=200)
    console.print(report.table())
    text = console.export_text()
    assert "2 layers flagged" in text and "nan !" in text and "1.7000 !" in text and "0.3000 !" not in text
    assert "flagged" in report.to_dict() and report.to_dict()["flagged"] == ["b.mlp.up_proj", "c.mlp.up_proj"]


def test_quantize_prints_the_flag_for_a_bad_init(tmp_path, monkeypatch):
    import lutq.quant.api as api

    real = api.init_from_weight_

    def bad_init(layer, weight, **kw):
        err = real(layer, weight, **kw)
        return 2.5 if layer.out_features == 128 else err  # the up/gate projections "went wrong"

    monkeypatch.setattr(api, "init_from_weight_", bad_init)
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=1), tiny_tokenizer())
    out = _run("quantize", "-m", str(tmp_path / "fp"), "-p", "q4a4", "-o", str(tmp_path / "q"))
    assert "2 layers flagged" in out and "model.layers.0.mlp.up_proj" in out


def test_calib_cache_of_another_tokenizer_is_refused(tmp_path):
    cache = tiny_cache(tmp_path / "kd", num_sequences=8)
    tok = tiny_tokenizer()
    tok.chat_template = "{{ messages }}"  # another chat template: another fingerprint
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=1), tok)
    with pytest.raises(LutqError, match="tokenizer mismatch"):
        quantize_checkpoint(str(tmp_path / "fp"), tmp_path / "q", "q4a4", calib=str(cache), show_progress=False)
    assert not (tmp_path / "q").exists()


def test_presets_and_config_files_are_validated(tmp_path):
    fp = tmp_path / "fp"
    save_checkpoint(fp, tiny_model("llama", layers=1), tiny_tokenizer())
    with pytest.raises(LutqError, match=r"unknown quantization preset 'q3a4'; choose from"):
        _run("quantize", "-m", str(fp), "-p", "q3a4", "-o", str(tmp_path / "q"))
    bad = tmp_path / "bad.toml"
    bad.write_text("group_size = 32\n[mlp]\nlut_size = 4\nrnak = 32\n")
    with pytest.raises(LutqError, match=r"bad.toml.mlp: unknown key\(s\) \['rnak'\]"):
        _run("quantize", "-m", str(fp), "--config", str(bad), "-o", str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()
    good = tmp_path / "good.toml"
    good.write_text('tighten_rounds = 1\n[mlp]\nlut_size = 4\nrank = 8\n[overrides]\n"*.down_proj" = "fp"\n')
    _run("quantize", "-m", str(fp), "--config", str(good), "-o", str(tmp_path / "q"), "--summary")
    model, _, _ = load_checkpoint(tmp_path / "q")
    layers = dict(lut_layers(model))
    assert "model.layers.0.mlp.down_proj" not in layers
    assert (layers["model.layers.0.mlp.up_proj"].lut_size, layers["model.layers.0.mlp.up_proj"].rank) == (4, 8)


@pytest.mark.parametrize("flag", ["--probe-tokens", "--probe-batch"])
def test_snap_refuses_an_empty_probe(ckpts, tmp_path, flag):
    with pytest.raises(LutqError, match=rf"snap: {flag} must be at least 1, got 0"):
        _run("snap", str(ckpts / "q2"), str(tmp_path / "s"), flag, "0")
    assert not (tmp_path / "s").exists()
