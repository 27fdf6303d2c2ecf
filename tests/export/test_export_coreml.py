"""Core ML export: the palettized program builds and saves; its weights reconstruct W_eff exactly; the same
graph executed with torch reproduces the model's logits. (Core ML prediction itself needs macOS.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lutq.core.errors import LutqError
from lutq.export import ExportConfig, build_ane_artefact, export
from lutq.export.ane import model_from_artefact
from lutq.export.coreml import (
    PACKAGE,
    load_package_program,
    package_effective_weights,
    run_graph_torch,
    verify_package,
)
from lutq.quant import lut_layers, quantize, snap_model
from lutq.testing import tiny_model

ct = pytest.importorskip("coremltools", reason="coremltools not installed (optional extra: pip install 'lutq[coreml]')")


def _snapped(arch: str, preset: str = "q2a4") -> torch.nn.Module:
    model = tiny_model(arch)
    quantize(model, preset, progress=False)
    snap_model(model)
    return model


@pytest.fixture(scope="module")
def qwen3_snapped() -> torch.nn.Module:
    """A snapped tiny q2a4 Qwen3 (treat as read-only)."""
    return _snapped("qwen3")


@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_torch_run_of_the_graph_matches_the_model(arch: str, qwen3_snapped) -> None:
    model = qwen3_snapped if arch == "qwen3" else _snapped(arch)
    art = build_ane_artefact(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    reference = model_from_artefact(art)(ids).logits
    torch.testing.assert_close(run_graph_torch(art, model, ids), reference, rtol=0, atol=1e-4)
    half = run_graph_torch(art, model, ids, dtype=torch.float16).float()  # what FP16 hardware computes, roughly
    assert (half - reference).abs().max() < 0.05 * reference.abs().max()


def test_coreml_package_for_tiny_qwen3(qwen3_snapped, tokenizer, tmp_path) -> None:
    model = qwen3_snapped
    res = export(model, tmp_path / "cm", "coreml", ExportConfig(seq_len=16), tokenizer=tokenizer)
    assert res.checks["max_abs_weff_diff"] == 0.0 and res.checks["graph_max_abs_logit_diff"] < 1e-4
    pkg = tmp_path / "cm" / PACKAGE
    spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "input_ids" and list(inp.type.multiArrayType.shape) == [1, 16]
    assert out.name == "logits" and list(out.type.multiArrayType.shape) == [1, 16, model.config.vocab_size]
    prog = load_package_program(pkg)
    luts = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    layers = dict(lut_layers(model))
    assert len(luts) == len(layers)
    from coremltools.converters.mil.mil import types

    widths = {name: types.builtin_to_string(op.indices.dtype) for name, op in ((op.name, op) for op in luts)}
    assert {w for n, w in widths.items() if "mlp" in n} == {"uint2"}  # 2-bit MLP indices, stored as such
    assert {w for n, w in widths.items() if "attn" in n} == {"uint4"}  # 4-bit attention indices
    weights = package_effective_weights(prog)
    art = build_ane_artefact(model)
    for name, layer in layers.items():  # exactly the model's W_eff, from the saved package's own numbers
        torch.testing.assert_close(weights[name.replace(".", "_")], art.effective_weight(name), rtol=0, atol=0)
        torch.testing.assert_close(art.effective_weight(name), layer.effective_weight(), rtol=1e-6, atol=1e-7)
    meta = json.loads((tmp_path / "cm" / "coreml.json").read_text())
    assert meta["seq_len"] == 16 and sorted(meta["palettized_layers"]) == sorted(layers)
    assert (tmp_path / "cm" / "tokenizer.json").is_file()


def test_verify_package_detects_a_changed_weight(tmp_path) -> None:
    model = _snapped("llama", "q4a4")
    export(model, tmp_path / "cm", "coreml", ExportConfig(seq_len=8, verify=False), tokenizer=None)
    art = build_ane_artefact(model)
    assert verify_package(art, tmp_path / "cm" / PACKAGE) == 0.0
    name = next(iter(art.lut_layers))
    art.tensors[f"{name}.scale_b"] = art.tensors[f"{name}.scale_b"] * 2
    assert verify_package(art, tmp_path / "cm" / PACKAGE) > 0


def test_coreml_rejects_unsupported_models(qwen3_snapped, tmp_path) -> None:
    from lutq.export.ane import AneArtefact
    from lutq.export.coreml import check_supported

    for bad in (
        {"model_type": "gemma3_text"},
        {"model_type": "llama", "hidden_act": "gelu"},
        {"model_type": "qwen3", "use_sliding_window": True},
    ):
        with pytest.raises(LutqError, match="Core ML export"):
            check_supported(AneArtefact({"model_config": bad}))
    with pytest.raises(LutqError, match="iOS18"):
        export(qwen3_snapped, tmp_path / "q", "coreml", ExportConfig(seq_len=8, deployment_target="iOS16"))
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_coreml_package_for_real_smollm2_q2a4(tmp_path) -> None:
    """The real SmolLM2 (vocab 49152, its tokenizer, tied embeddings), loaded with only its first 2 of 30
    decoder layers to keep CI fast; q2a4 with the real initialization. The full model: docs/export.md."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lutq.assets import asset_path
    from lutq.testing import require_asset

    require_asset("smollm2-135m-instruct")
    path = asset_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    quantize(model, "q2a4", progress=False)
    res = export(model, tmp_path / "smol", "coreml", ExportConfig(seq_len=32), tokenizer=tok)
    assert res.checks["max_abs_weff_diff"] == 0.0
    assert res.checks["graph_max_abs_logit_diff"] < 1e-3
    meta = json.loads((tmp_path / "smol" / "coreml.json").read_text())
    assert meta["outputs"]["logits"]["shape"] == [1, 32, 49152] and len(meta["palettized_layers"]) == 14
    assert np.isclose(res.size["lut"]["bits_per_weight"], meta["size"]["quantized"]["bits_per_weight"])
