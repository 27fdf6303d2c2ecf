"""quantize() on the three tiny architectures, presets and overrides, trainable sets, dequantize_."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lutq
from lutq.core import LutqError
from lutq.quant import (
    PRESETS,
    LayerSpec,
    LUTEmbedding,
    LUTLinear,
    QuantConfig,
    dequantize_,
    get_preset,
    lut_layers,
    quantize,
    set_trainable,
)
from lutq.quant.presets import group_of
from lutq.testing import tiny_model

IDS = torch.tensor([[5, 17, 99, 250, 3, 64, 128, 7, 300, 12]])
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_presets_registry() -> None:
    assert set(PRESETS) == {"q2a4", "q4a4", "q4a4_r32", "q2a2"}
    q = get_preset("q2a4")
    assert (q.mlp.lut_size, q.mlp.rank, q.attn.lut_size, q.attn.rank) == (4, 32, 16, 8)
    assert (get_preset("q2a2").attn.lut_size, get_preset("q4a4_r32").mlp.rank) == (4, 32)
    q.mlp.rank = 1
    assert get_preset("q2a4").mlp.rank == 32  # a copy
    with pytest.raises(LutqError, match="unknown quantization preset"):
        get_preset("q3a3")
    cfg = QuantConfig.from_dict({"mlp": {"lut_size": 8, "rank": 2}, "overrides": {"*.0.mlp.*": None}})
    assert cfg.mlp == LayerSpec(8, 2) and QuantConfig.from_dict(cfg.to_dict()) == cfg
    # a TOML file has no null: "fp" keeps a layer in full precision; anything else is an error naming the key
    toml_cfg = QuantConfig.from_dict({"overrides": {"*.self_attn.*": "fp", "*.0.mlp.*": {"lut_size": 16}}})
    assert toml_cfg.overrides == {"*.self_attn.*": None, "*.0.mlp.*": {"lut_size": 16}}
    assert toml_cfg.spec_for("model.layers.3.self_attn.q_proj") is None
    assert toml_cfg.spec_for("model.layers.3.mlp.up_proj") == ("mlp", toml_cfg.mlp)
    # a partial override changes only the keys it names of the group's spec (the MLP's rank 32 and k-means stay)
    kmeans = QuantConfig.from_dict({"mlp": {"lut_kind": "kmeans"}, "overrides": {"*.0.mlp.*": {"lut_size": 16}}})
    assert kmeans.spec_for("model.layers.0.mlp.down_proj") == ("mlp", LayerSpec(16, 32, "kmeans"))
    assert kmeans.spec_for("model.layers.0.self_attn.q_proj") == ("attn", kmeans.attn)
    assert QuantConfig.from_dict(kmeans.to_dict()) == kmeans
    assert kmeans.with_lut_kind("uniform").spec_for("model.layers.0.mlp.up_proj") == ("mlp", LayerSpec(16, 32))
    whole = QuantConfig.from_dict({"overrides": {"x": {"lut_size": 8, "rank": 2, "lut_kind": "kmeans"}}})
    assert whole.overrides == {"x": LayerSpec(8, 2, "kmeans")}
    with pytest.raises(LutqError, match=r"overrides\['x'\].*rank"):
        QuantConfig.from_dict({"overrides": {"x": {"rank": 1.5}}})
    with pytest.raises(LutqError, match=r"overrides\['x'\].*'fp'"):
        QuantConfig.from_dict({"overrides": {"x": "full"}})
    with pytest.raises(LutqError, match="lut_size"):
        LayerSpec(300, 4)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.mlp.gate_proj",
        "model.layers.11.self_attn.o_proj",
        "model.language_model.layers.3.mlp.down_proj",
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.layers.0.mlp",
        "model.layers.0.mlp.act_fn",
    ],
)
def test_group_patterns(name: str) -> None:
    expect = {
        "gate_proj": "mlp",
        "o_proj": "attn",
        "down_proj": "mlp",
        "lm_head": "lm_head",
        "embed_tokens": "embed",
    }.get(name.rsplit(".", 1)[-1])
    assert group_of(name) == expect


def test_quantize_three_architectures(tiny: nn.Module) -> None:
    ref = tiny(IDS).logits
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    report = lutq.quantize(tiny, "q4a4", progress=False)
    names = [n for n, _ in lut_layers(tiny)]
    assert len(names) == len(report.rows) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == set(MLP + ATTN)
    assert all(0 < r.rel_error < 0.2 for r in report.rows)  # 4-bit on N(0, 0.02) weights
    assert _rel(tiny(IDS).logits, ref) < 0.5
    # embeddings, lm_head and norms untouched (same values, same types, still tied)
    after = tiny.state_dict()
    for k, v in before.items():
        if not any(f".{p}." in k for p in MLP + ATTN):
            assert torch.equal(after[k], v), k
    assert isinstance(tiny.lm_head, nn.Linear) and tiny.lm_head.weight is tiny.get_input_embeddings().weight
    table = report.table()
    assert table.row_count == 14 + 2 and report.to_dict()["summary"]["mlp"]["layers"] == 6
    with pytest.raises(LutqError, match="already has LUT layers"):
        quantize(tiny, "q4a4")


def test_overrides_kinds_and_latent() -> None:
    model = tiny_model("qwen3")
    cfg = get_preset("q2a4")
    cfg.overrides = {"model.layers.0.mlp.*": None, "re:layers\\.1\\.self_attn\\.[qk]_proj$": LayerSpec(8, 2, "kmeans")}
    cfg.mode = "latent"
    report = quantize(model, cfg, progress=False)
    layers = dict(lut_layers(model))
    assert not any(n.startswith("model.layers.0.mlp") for n in layers)
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)
    q = layers["model.layers.1.self_attn.q_proj"]
    assert (q.lut_size, q.rank, q.mode) == (8, 2, "latent")
    assert layers["model.layers.1.mlp.up_proj"].lut_size == 4 and len(report.rows) == 11
    assert {r.lut_kind for r in report.rows} == {"uniform", "kmeans"}


def test_set_trainable_modes_give_the_right_grads() -> None:
    model = tiny_model("llama")
    quantize(model, "q4a4", progress=False)

    def grads(mode: str, **kw) -> set[str]:
        names = set_trainable(model, mode, **kw)
        if not names:
            return set()
        model.zero_grad(set_to_none=True)
        model(IDS).logits.square().mean().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == set(names), (mode, got ^ set(names))
        return got

    every = grads("all")
    assert every and all(n.rsplit(".", 1)[-1] in ("scale_A", "scale_B", "scale_g") for n in every)
    assert len(every) == 14 * 3
    assert {n for n in grads("mlp-only")} == {n for n in every if ".mlp." in n}
    assert {n for n in grads("attn-only")} == {n for n in every if ".self_attn." in n}
    assert {n for n in grads("g-only")} == {n for n in every if n.endswith("scale_g")}
    assert {n for n in grads("freeze-g")} == {n for n in every if not n.endswith("scale_g")}
    assert {n.rsplit(".", 1)[-1] for n in grads("lut")} == {"lut"}
    assert len(grads("g-only", lut=True)) == 28
    assert grads("none") == set()
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad and not model.model.norm.weight.requires_grad
    with pytest.raises(LutqError, match="unknown mode"):
        set_trainable(model, "embeddings")
    with pytest.raises(LutqError, match="no LUT layers"):
        set_trainable(tiny_model("llama"), "all")


def test_dequantize_matches_lut_forward(tiny: nn.Module) -> None:
    quantize(tiny, "q2a4", progress=False)
    out = tiny(IDS).logits
    dequantize_(tiny)
    assert not list(lut_layers(tiny)) and isinstance(tiny.model.layers[0].mlp.up_proj, nn.Linear)
    assert torch.allclose(tiny(IDS).logits, out, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_quantize_lm_head_and_embeddings_unties(arch: str) -> None:
    model = tiny_model(arch)
    ref = model(IDS).logits
    emb_before = model.get_input_embeddings().weight.detach().clone()
    cfg = get_preset("q4a4").replace(quantize_lm_head=True, quantize_embeddings=True)
    cfg.lm_head = cfg.embed = LayerSpec(256, 16)
    quantize(model, cfg, progress=False)
    assert isinstance(model.lm_head, LUTLinear) and isinstance(model.get_input_embeddings(), LUTEmbedding)
    assert model.config.tie_word_embeddings is False
    emb = model.get_input_embeddings()
    assert _rel(emb.effective_weight().detach(), emb_before) < 0.05
    assert _rel(model(IDS).logits, ref) < 0.5
    out = model(IDS).logits
    dequantize_(model)
    assert torch.allclose(model(IDS).logits, out, atol=1e-5)


def test_quantize_rejects_models_without_matches() -> None:
    with pytest.raises(LutqError, match="no layers"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "q4a4")
    with pytest.raises(LutqError, match="preset name"):
        quantize(tiny_model("qwen3"), 42)  # type: ignore[arg-type]
