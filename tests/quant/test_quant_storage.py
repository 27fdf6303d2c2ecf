"""Checkpoints of LUT models: packed indices, bit-exact round trips, size formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lutq.core import LutqError
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import get_preset, lut_layers, quant_config_of, quantize, snap_model, storage
from lutq.testing import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 99, 250, 3, 64, 128, 7, 300, 12]])


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (na, la), (nb, lb) in zip(lut_layers(a), lut_layers(b), strict=True):
        assert na == nb and la.layout() == lb.layout()
    assert torch.equal(a(IDS).logits, b(IDS).logits)


@pytest.mark.parametrize(("arch", "kind"), [("qwen3", "frozen"), ("llama", "snapped"), ("gemma3", "latent")])
def test_checkpoint_round_trip_bit_exact(tmp_path: Path, arch: str, kind: str) -> None:
    model = tiny_model(arch)
    cfg = get_preset("q2a4").replace(mode="latent" if kind == "latent" else None)
    quantize(model, cfg, progress=False)
    if kind == "snapped":
        snap_model(model)
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer())
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    _assert_same(model, loaded)
    assert info.snapped == (kind == "snapped") and info.quant["config"]["preset"] == "q2a4"
    assert quant_config_of(loaded) == quant_config_of(model)
    with safe_open(str(tmp_path / "ck/model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.up_proj"
        assert f"{name}.idx_packed" in keys and f"{name}.idx" not in keys
        assert f.get_tensor(f"{name}.idx_packed").numel() == 128 * 64 // 4  # 2-bit: 4 per byte
        assert f.get_tensor("model.layers.0.self_attn.q_proj.idx_packed").numel() == 64 * 64 // 2
        assert (f"{name}.latent" in keys) == (kind == "latent") and f"{name}.weight" not in keys  # latent only
        assert f.get_tensor(f"{name}.scale_A").dtype == (torch.float16 if kind == "snapped" else torch.float32)
    if kind == "latent":
        assert loaded.model.layers[0].mlp.up_proj.latent.requires_grad


def test_latent_checkpoint_in_weight_units_loads_as_scale_units(tmp_path: Path) -> None:
    # lutq before 2026-11-30 stored latent layers' weights W as `<name>.weight`; now u = W / S as `.latent`
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    quantize(model, get_preset("q2a4").replace(mode="latent"), progress=False)
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer())
    tensors = load_file(str(tmp_path / "ck/model.safetensors"))
    for name, layer in lut_layers(model):
        tensors[f"{name}.weight"] = (tensors.pop(f"{name}.latent") * layer.scale_map().detach()).contiguous()
    save_file(tensors, str(tmp_path / "ck/model.safetensors"))
    loaded, _, _ = load_checkpoint(tmp_path / "ck", verify=False)  # the file changed under config.json's sha256
    for (_, a), (_, b) in zip(lut_layers(model), lut_layers(loaded), strict=True):
        assert torch.allclose(a.latent, b.latent, atol=1e-6) and b.latent.requires_grad
        assert torch.equal(a.idx, b.idx)
    assert torch.allclose(model(IDS).logits, loaded(IDS).logits, atol=1e-5)


def test_size_report_formula_and_disk_bytes(tmp_path: Path) -> None:
    model = tiny_model("qwen3")  # hidden 64, intermediate 128, heads 4 (head_dim 16), kv heads 2, 2 layers
    quantize(model, "q2a4", progress=False)
    rep = storage.size_report(model)
    mlp, attn = rep["groups"]["mlp"], rep["groups"]["attn"]
    # mlp: 3 × 128×64 per layer at 2 bits, rank 32 FP16 scales (out + in + 1) per layer, 4-entry LUT
    assert mlp["weights"] == 2 * 3 * 128 * 64
    assert mlp["bits"] == 2 * (3 * 128 * 64 * 2 + 3 * 16 * 4 + 3 * 16 * 32 * (128 + 64 + 1))
    # attn: q 64×64, k 32×64, v 32×64, o 64×64 at 4 bits, rank 8, 16-entry LUT
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64)]
    assert attn["bits"] == 2 * sum(o * i * 4 + 16 * 16 + 16 * 8 * (o + i + 1) for o, i in shapes)
    assert attn["bits_per_weight"] == pytest.approx(attn["bits"] / attn["weights"])
    snap_model(model)  # FP16 scales on disk, as in the formula
    rep = storage.size_report(model)
    save_checkpoint(tmp_path / "ck", model)
    size = (tmp_path / "ck/model.safetensors").stat().st_size
    assert rep["disk_bytes"] <= size < rep["disk_bytes"] + 64 * 1024  # + the safetensors JSON header
    quant_bytes = rep["disk_bytes"] - rep["other_bytes"]
    assert quant_bytes == pytest.approx(rep["quantized"]["bits"] / 8, rel=0.01)  # formula == what is written


def test_size_report_on_meta_device() -> None:
    with torch.device("meta"):
        model = tiny_model("llama")
    quantize(model, "q4a4", init=False, progress=False)
    rep = storage.size_report(model)
    assert rep["quantized"]["layers"] == 14 and rep["disk_bytes"] > 0


def test_layout_errors(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    quantize(model, "q4a4", progress=False)
    save_checkpoint(tmp_path / "ck", model)
    cfg_path = tmp_path / "ck/config.json"
    cfg = json.loads(cfg_path.read_text())
    layers = cfg["quant"]["layers"]
    layers["model.layers.9.mlp.up_proj"] = layers.pop("model.layers.0.mlp.up_proj")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LutqError, match="no module 'model.layers.9.mlp.up_proj'"):
        load_checkpoint(tmp_path / "ck")
    cfg["quant"]["version"] = 7
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LutqError, match="quant.version"):
        load_checkpoint(tmp_path / "ck")
    fresh = tiny_model("qwen3")
    storage.apply_quant_layout(fresh, storage.quant_layout(model))
    with pytest.raises(LutqError, match="idx_packed"):
        storage.decode_state(fresh, {})
    assert not storage.is_snapped(fresh) and not storage.is_snapped(tiny_model("qwen3"))
