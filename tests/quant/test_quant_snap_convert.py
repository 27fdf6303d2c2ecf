"""FP16 snap (idempotent, bounded error), q4 → q2 conversion, latent → frozen."""

from __future__ import annotations

import pytest
import torch

from lutq.core import LutqError
from lutq.quant import (
    convert_q4_to_q2,
    freeze_latent,
    get_preset,
    lut_layers,
    quant_config_of,
    quantize,
    snap_model,
)
from lutq.quant.convert import convert_layer, usage_weights
from lutq.quant.lut import is_fp16_exact
from lutq.testing import tiny_model

IDS = torch.tensor([[5, 17, 99, 250, 3, 64, 128, 7, 300, 12]])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_snap_is_fp16_exact_bounded_and_idempotent(arch: str) -> None:
    model = tiny_model(arch)
    quantize(model, "q2a4", progress=False)
    report = snap_model(model)
    assert len(report.layers) == 14 and report.probe_shape == (2, 32)
    assert report.max_abs_error > 0 and report.rel_error < 1e-2  # FP16 rounding of the scales only
    for _, layer in lut_layers(model):
        assert layer.snapped and torch.equal(layer.scale_g, torch.ones_like(layer.scale_g))
        assert all(is_fp16_exact(t.detach()) for t in (layer.lut, layer.scale_A, layer.scale_B))
        assert not any(p.requires_grad for p in layer.parameters())
    snapped = _state(model)
    logits = model(IDS).logits
    again = snap_model(model)
    assert sum(r["idx_changed"] for r in again.layers) == 0 and again.max_abs_error == 0.0
    assert all(torch.equal(snapped[k], v) for k, v in model.state_dict().items())  # bitwise
    assert torch.equal(model(IDS).logits, logits)
    assert "max |Δlogit|" in report.summary()


def test_snap_uses_given_probe_and_refuses_latent() -> None:
    model = tiny_model("llama")
    quantize(model, get_preset("q4a4").replace(mode="latent"), progress=False)
    with pytest.raises(LutqError, match="latent-to-frozen"):
        snap_model(model)
    mixed = tiny_model("llama")  # frozen layers before one latent layer: refused before any layer is snapped
    quantize(mixed, "q4a4", progress=False)
    layers = dict(lut_layers(mixed))
    layers["model.layers.1.mlp.down_proj"].unfreeze()
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(LutqError, match=r"model\.layers\.1\.mlp\.down_proj is latent.*nothing was snapped"):
        snap_model(mixed)
    assert not any(la.snapped for la in layers.values())
    assert all(torch.equal(before[k], v) for k, v in mixed.state_dict().items())
    assert freeze_latent(model) == 14 and quant_config_of(model).mode == "frozen"
    assert freeze_latent(model) == 0
    report = snap_model(model, IDS)
    assert report.probe_shape == tuple(IDS.shape)


def test_convert_q4_to_q2() -> None:
    model = tiny_model("qwen3")
    quantize(model, "q4a4", progress=False)
    q4 = {n: layer.effective_weight().detach().clone() for n, layer in lut_layers(model)}
    ref = model(IDS).logits.detach()
    report = convert_q4_to_q2(model)
    layers = dict(lut_layers(model))
    for name, layer in layers.items():
        mlp = ".mlp." in name
        assert (layer.lut_size, layer.rank) == ((4, 32) if mlp else (16, 8))
        assert is_fp16_exact(layer.lut) and bool((layer.lut[1:] > layer.lut[:-1]).all())
        err = float((layer.effective_weight().detach() - q4[name]).norm() / q4[name].norm())
        row = next(r for r in report.rows if r.name == name)
        assert row.rel_error == pytest.approx(err, rel=1e-4)
        # attention keeps its LUT: only tiny new-rank directions were added, so W_eff barely moves
        assert err < (0.6 if mlp else 0.02)
    assert report.mean_error("mlp") > report.mean_error("attn")
    cfg = quant_config_of(model)
    assert (cfg.mlp.lut_size, cfg.mlp.rank, cfg.attn.rank, cfg.preset) == (4, 32, 8, "q2a4")
    out = model(IDS).logits.detach()
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 1.0
    with pytest.raises(LutqError, match="no mlp/attn"):
        convert_q4_to_q2(torch.nn.Sequential())


def test_convert_layer_kmeans_weights_and_tighten() -> None:
    model = tiny_model("llama")
    quantize(model, "q4a4", progress=False)
    layer = model.model.layers[0].mlp.up_proj
    w = usage_weights(layer)
    s2 = layer.scale_map().detach().pow(2)
    j = int(layer.idx[0, 0])
    assert w.shape == (16,) and w[j].item() == pytest.approx(float(s2[layer.idx == j].sum()), rel=1e-5)
    _, e0, _ = convert_layer(layer, 4, 32)
    _, e2, _ = convert_layer(layer, 4, 32, tighten_rounds=3)
    assert e2 < e0


def test_convert_activation_aware_weights_fit_the_heavy_columns_better() -> None:
    model = tiny_model("llama")
    quantize(model, "q4a4", progress=False)
    layer = model.model.layers[0].mlp.up_proj
    target = layer.effective_weight().detach().clone()
    n_in = layer.in_features
    energy = torch.ones(n_in)
    energy[:4] = 400.0  # the first 4 inputs carry nearly all the activation energy
    hessian = torch.diag(energy)
    cw = energy / energy.mean()
    weighted = usage_weights(layer, cw)
    s2 = layer.scale_map().detach().pow(2) * cw[None, :]
    j = int(layer.idx[0, 0])
    assert weighted[j].item() == pytest.approx(float(s2[layer.idx == j].sum()), rel=1e-5)

    def heavy_error(act_power: float) -> float:
        new, _, _ = convert_layer(layer, 4, 32, tighten_rounds=2, hessian=hessian, act_power=act_power)
        return float((new.effective_weight().detach() - target)[:, :4].norm() / target[:, :4].norm())

    assert heavy_error(1.0) < 0.9 * heavy_error(0.0)
    with pytest.raises(LutqError, match="act_power"):
        convert_q4_to_q2(model, act_power=-0.5)
