"""ANE artefact: every tensor described, the documented packing, reload reproduces the snapped logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.export import ExportConfig, build_ane_artefact, export, load_ane_artefact
from lutq.quant import lut_layers, snap_model

PROBE = torch.tensor([[5, 77, 130, 9, 250, 31, 64, 200, 3, 19, 88, 101, 7, 7, 300, 2]])


def _q2a4(arch: str) -> torch.nn.Module:
    from lutq.quant import quantize
    from lutq.testing import tiny_model

    model = tiny_model(arch)
    quantize(model, "q2a4", progress=False)
    return model


def _unpack_as_documented(packed: np.ndarray, bits: int, shape: list[int]) -> np.ndarray:
    """docs/formats.md: element j of the row-major [out, in] indices is in byte j // (8/b), bits (j % (8/b))·b."""
    per = 8 // bits
    j = np.arange(shape[0] * shape[1])
    return ((packed[j // per] >> ((j % per) * bits)) & ((1 << bits) - 1)).reshape(shape)


@torch.no_grad()
def test_ane_reload_reproduces_snapped_logits(lut_tiny, tokenizer, tmp_path) -> None:
    res = export(lut_tiny, tmp_path / "ane", "ane", ExportConfig(keep_dtype=True), tokenizer=tokenizer)
    assert res.snap and "snapped" in res.snap  # export snapped the unsnapped model
    assert res.checks["max_abs_logit_diff"] == 0.0
    reloaded, tok = load_ane_artefact(tmp_path / "ane")
    assert tok is not None and tok.get_vocab() == tokenizer.get_vocab()
    assert all(layer.snapped for _, layer in lut_layers(reloaded))
    torch.testing.assert_close(reloaded(PROBE).logits, lut_tiny(PROBE).logits, rtol=0, atol=0)


@torch.no_grad()
def test_fp16_artefact_equals_snapped_model_with_fp16_dense_weights(tokenizer, tmp_path) -> None:
    lut_tiny = _q2a4("qwen3")
    snap_model(lut_tiny)
    export(lut_tiny, tmp_path / "ane", "ane", tokenizer=tokenizer)
    for name, p in lut_tiny.named_parameters():  # the reference: dense tensors rounded to FP16
        if not any(name.startswith(n + ".") for n, _ in lut_layers(lut_tiny)):
            p.copy_(p.half().float())
    reloaded, _ = load_ane_artefact(tmp_path / "ane")
    torch.testing.assert_close(reloaded(PROBE).logits, lut_tiny(PROBE).logits, rtol=0, atol=1e-5)


def test_config_describes_every_tensor_and_the_packing(tokenizer, tmp_path) -> None:
    model = _q2a4("llama")
    snap_model(model)
    export(model, tmp_path / "ane", "ane", tokenizer=tokenizer)
    cfg = json.loads((tmp_path / "ane" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "ane" / cfg["weights"]))
    assert cfg["format"] == "lutq-ane" and cfg["format_version"] == 1
    assert set(cfg["tensors"]) == set(tensors)
    assert cfg["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in tensors
    for name, entry in cfg["tensors"].items():
        assert list(tensors[name].shape) == entry["shape"] and tensors[name].dtype.name == entry["dtype"], name
        assert entry["role"] in {
            "lut",
            "indices",
            "scale_ag",
            "scale_b",
            "bias",
            "embedding",
            "norm",
            "lm_head",
            "linear_weight",
            "linear_bias",
            "other",
        }
    layers = dict(lut_layers(model))
    assert set(cfg["lut_layers"]) == set(layers)
    for name, spec in cfg["lut_layers"].items():
        layer = layers[name]
        assert spec["lut_size"] == layer.lut_size and spec["rank"] == layer.rank
        assert spec["group"] in ("mlp", "attn") and spec["index_bits"] == {4: 2, 16: 4}[layer.lut_size]
        pack = cfg["tensors"][f"{name}.indices"]["packing"]
        idx = _unpack_as_documented(tensors[f"{name}.indices"], pack["bits"], pack["shape"])
        np.testing.assert_array_equal(idx, layer.idx.numpy())
        q = tensors[f"{name}.lut"].astype(np.float32)[idx]
        s = tensors[f"{name}.scale_ag"].astype(np.float32) @ tensors[f"{name}.scale_b"].astype(np.float32)
        np.testing.assert_allclose(q * s, layer.effective_weight().numpy(), rtol=1e-6, atol=1e-7)
    assert cfg["model_config"]["model_type"] == "llama" and "forward" in cfg and "index_packing" in cfg
    assert cfg["size"]["quantized"]["layers"] == len(layers)


def test_ane_export_needs_a_lut_model(tokenizer, tmp_path) -> None:
    from lutq.testing import tiny_model

    with pytest.raises(LutqError, match="LUT"):
        export(tiny_model("qwen3"), tmp_path / "x", "ane", tokenizer=tokenizer)
    model = _q2a4("qwen3")
    with pytest.raises(LutqError, match="not snapped"):
        build_ane_artefact(model)
    assert not (tmp_path / "x").exists()


def test_corrupt_artefact_is_reported(tokenizer, tmp_path) -> None:
    lut_tiny = _q2a4("llama")
    snap_model(lut_tiny)
    export(lut_tiny, tmp_path / "ane", "ane", ExportConfig(verify=False), tokenizer=tokenizer)
    (tmp_path / "ane" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LutqError, match="model.safetensors"):
        load_ane_artefact(tmp_path / "ane")
    with pytest.raises(LutqError, match="not a lutq ANE artefact"):
        load_ane_artefact(tmp_path)


def test_export_cli_ane(tokenizer, tmp_path) -> None:
    from lutq.cli import app
    from lutq.models import save_checkpoint
    from lutq.quant import quantize
    from lutq.testing import tiny_model

    model = tiny_model("gemma3")
    quantize(model, "q4a4", progress=False)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = CliRunner().invoke(app, ["export", str(tmp_path / "ckpt"), str(tmp_path / "ane"), "--keep-dtype"])
    assert out.exit_code == 0, out.output
    assert "check max_abs_logit_diff: 0" in out.output and "bits/weight" in out.output
    assert (tmp_path / "ane" / "config.json").is_file()


def test_coreml_without_coremltools_is_a_clear_error(monkeypatch) -> None:
    import sys

    from lutq.export.coreml import _require_coremltools

    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if not installed
    with pytest.raises(LutqError, match=r"pip install 'lutq\[coreml\]'"):
        _require_coremltools()
