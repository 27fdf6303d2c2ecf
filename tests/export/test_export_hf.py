"""HF export: W_eff baked into nn.Linear; AutoModelForCausalLM reloads it with the same logits."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lutq.export import ExportConfig, export
from lutq.models import load_model, save_checkpoint

PROBE = torch.tensor([[5, 77, 130, 9, 250, 31, 64, 200, 3, 19, 88, 101]])


@torch.no_grad()
def test_hf_round_trip_same_logits(lut_tiny, tokenizer, tmp_path) -> None:
    save_checkpoint(tmp_path / "ckpt", lut_tiny, tokenizer)
    source, _ = load_model(tmp_path / "ckpt")
    expected = source(PROBE).logits
    res = export(tmp_path / "ckpt", tmp_path / "hf", "hf")
    assert res.checks["max_abs_logit_diff"] <= 1e-5
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any(getattr(m, "lutq_quantized", False) for m in hf.modules())
    assert all(type(m).__name__ != "LUTLinear" for m in hf.modules())
    torch.testing.assert_close(hf(PROBE).logits, expected, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").get_vocab() == tokenizer.get_vocab()
    meta = json.loads((tmp_path / "hf" / "lutq_export.json").read_text())
    assert meta["dequantized"] is True and meta["source"] == str(tmp_path / "ckpt")


def test_hf_export_of_a_plain_model_and_dtype(tokenizer, tmp_path) -> None:
    from lutq.testing import tiny_model

    model = tiny_model("llama")
    res = export(model, tmp_path / "hf16", "hf", ExportConfig(hf_dtype="fp16"), tokenizer=tokenizer)
    assert res.checks["max_abs_logit_diff"] < 1e-2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf16")
    assert next(reloaded.parameters()).dtype == torch.float16


def test_export_cli_hf(tokenizer, tmp_path) -> None:
    from lutq.cli import app
    from lutq.quant import quantize
    from lutq.testing import tiny_model

    model = tiny_model("qwen3")
    quantize(model, "q4a4", progress=False)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = CliRunner().invoke(app, ["export", "--format", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert out.exit_code == 0, out.output
    assert "whole model" in out.output and "max_abs_logit_diff" in out.output
    assert (tmp_path / "hf" / "config.json").is_file()
    bad = CliRunner().invoke(app, ["export", "--format", "onnx", str(tmp_path / "ckpt"), str(tmp_path / "x")])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
