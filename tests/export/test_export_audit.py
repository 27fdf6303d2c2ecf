"""Export audit: the artefacts against docs/formats.md, read back by code written from the docs alone.

- ane: file names, config keys, tensor names / dtypes / shapes / roles, the index packing (odd sizes, zero
  padding bits); an independent numpy forward (float64) of the factored artefact reproduces the snapped
  model's logits for Qwen3 (q/k norms, tied), Llama (LUT embedding + LUT lm_head, biases, a full-precision
  override, 1/2/8-bit storage) and Gemma 3 (scaled embeddings, sliding + full layers, final softcapping).
- hf: plain transformers (in a process without lutq) loads the directory with the lutq logits and the
  tokenizer's chat template.
- coreml: the LUT embedding / lm_head / bias / odd-LUT-size paths build, verify and keep their palettes.
- bad input and safety: latent models, OUT = CKPT, unrelated non-empty OUT, a kill during the write, wrong
  format, a newer format version.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.export import ExportConfig, export, load_ane_artefact, read_ane_artefact
from lutq.quant import QuantConfig, lut_layers, quantize, snap_model
from lutq.quant.presets import LayerSpec
from lutq.testing import tiny_config, tiny_model

SEQ = 40  # longer than the Gemma 3 variants' sliding window (16)


# ------------------------------------------------------------------------------------------ models
def _from_config(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases that matter (the init makes them 1 / 0)
        gemma = config.model_type.startswith("gemma3")
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def _gemma3_config():
    config = tiny_config("gemma3")
    config.layer_types = ["sliding_attention", "full_attention"]
    config.sliding_window = 16
    config.final_logit_softcapping = 0.5  # small: the tanh changes the logits (|logits| ~ 0.7)
    return config


def _variant(name: str) -> torch.nn.Module:
    """A snapped tiny LUT model. Variants cover every layout docs/formats.md describes."""
    if name == "qwen3":  # q/k norms, tied dense embeddings, q2a4
        model, cfg = _from_config(tiny_config("qwen3")), "q2a4"
    elif name == "llama_mixed":  # odd sizes; LUT embedding (1-bit) and lm_head (2-bit, untied); LUT biases;
        config = tiny_config("llama", vocab_size=321, hidden=50, heads=5, kv_heads=1)  # a dense override
        config.attention_bias = config.mlp_bias = True
        model = _from_config(config)
        cfg = QuantConfig(
            quantize_embeddings=True,
            quantize_lm_head=True,
            embed=LayerSpec(2, 1),
            lm_head=LayerSpec(4, 2),
            overrides={
                "model.layers.0.self_attn.q_proj": None,
                "model.layers.0.mlp.up_proj": LayerSpec(3, 2),
                "model.layers.1.mlp.up_proj": LayerSpec(32, 3),
            },
        )
    elif name == "gemma3":  # scaled tied dense embeddings, sliding + full attention, final softcapping
        model, cfg = _from_config(_gemma3_config()), "q2a4"
    elif name == "gemma3_lut_embed":  # scaled LUT embedding (embed_scale), untied dense lm_head
        model, cfg = _from_config(_gemma3_config()), QuantConfig(quantize_embeddings=True)
    else:
        raise ValueError(name)
    quantize(model, cfg, progress=False)
    snap_model(model)
    return model


def _probe(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))


def _round_dense_to_fp16(model: torch.nn.Module) -> None:
    """What the default artefact stores: the dense tensors rounded to FP16 (the LUT layers are FP16 already)."""
    names = [n for n, _ in lut_layers(model)]
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not any(pname.startswith(n + ".") for n in names):
                p.copy_(p.half().float())


# ------------------------------------------------------------------ numpy reader written from the docs
def _unpack(packed: np.ndarray, bits: int, shape: list[int]) -> np.ndarray:
    per = 8 // bits
    j = np.arange(shape[0] * shape[1])
    return ((packed[j // per] >> ((j % per) * bits)) & ((1 << bits) - 1)).reshape(shape)


class NumpyArtefact:
    """The decoder of docs/formats.md: LUT layers in the factored form, the rest the standard HF semantics of
    `model_config` (Llama / Qwen3 / Gemma 3), in float64 from config.json + model.safetensors only."""

    def __init__(self, path: Path) -> None:
        self.cfg = json.loads((path / "config.json").read_text())
        self.t = load_file(str(path / self.cfg["weights"]))
        self.mc = self.cfg["model_config"]
        self.gemma = self.mc["model_type"].startswith("gemma3")

    def tensor(self, name: str) -> np.ndarray:
        return self.t[self.cfg["tied"].get(name, name)].astype(np.float64)

    def q(self, layer: str) -> np.ndarray:
        names = self.cfg["lut_layers"][layer]["tensors"]
        pack = self.cfg["tensors"][names["indices"]]["packing"]
        return self.t[names["lut"]].astype(np.float64)[_unpack(self.t[names["indices"]], pack["bits"], pack["shape"])]

    def weff(self, layer: str) -> np.ndarray:
        names = self.cfg["lut_layers"][layer]["tensors"]
        return self.q(layer) * (
            self.t[names["scale_ag"]].astype(np.float64) @ self.t[names["scale_b"]].astype(np.float64)
        )

    def linear(self, x: np.ndarray, module: str) -> np.ndarray:
        spec = self.cfg["lut_layers"].get(module)
        if spec is None:
            y = x @ self.tensor(module + ".weight").T
            return y + self.tensor(module + ".bias") if module + ".bias" in self.t else y
        names, q = spec["tensors"], self.q(module)  # y = sum_k scale_ag[:, k] * (Q @ (scale_b[k, :] * x)) + bias
        ag, b = self.t[names["scale_ag"]].astype(np.float64), self.t[names["scale_b"]].astype(np.float64)
        y = sum(ag[:, k] * ((b[k] * x) @ q.T) for k in range(spec["rank"]))
        return y + self.t[names["bias"]].astype(np.float64) if spec["bias"] else y

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.tensor(name)
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + self.mc["rms_norm_eps"])
        return y * (1.0 + w) if self.gemma else y * w

    def rope(self, x: np.ndarray, layer_type: str) -> np.ndarray:
        params = self.mc["rope_parameters"]
        params = params.get(layer_type, params)
        assert params.get("rope_type", "default") == "default"
        d = x.shape[-1]
        ang = np.arange(x.shape[1])[:, None] / params["rope_theta"] ** (np.arange(0, d, 2) / d)[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        return x * cos + np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin

    def attention(self, x: np.ndarray, i: int) -> np.ndarray:
        mc, p, T = self.mc, f"model.layers.{i}.self_attn", x.shape[0]
        H, KV, d = mc["num_attention_heads"], mc["num_key_value_heads"], mc["head_dim"]
        layer_type = (mc.get("layer_types") or ["full_attention"] * mc["num_hidden_layers"])[i]
        q, k, v = (self.linear(x, f"{p}.{n}_proj").reshape(T, h, d) for n, h in (("q", H), ("k", KV), ("v", KV)))
        if f"{p}.q_norm.weight" in self.t:
            q, k = self.norm(q, f"{p}.q_norm.weight"), self.norm(k, f"{p}.k_norm.weight")
        q, k, v = (a.transpose(1, 0, 2) for a in (q, k, v))
        q, k = self.rope(q, layer_type), self.rope(k, layer_type)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) * (mc["query_pre_attn_scalar"] if self.gemma else d) ** -0.5
        if mc.get("attn_logit_softcapping"):
            s = np.tanh(s / mc["attn_logit_softcapping"]) * mc["attn_logit_softcapping"]
        qi, ki = np.arange(T)[:, None], np.arange(T)[None]
        allowed = ki <= qi
        if layer_type == "sliding_attention":
            allowed &= qi - ki < mc["sliding_window"]
        s = np.exp(np.where(allowed, s, -np.inf) - s.max(-1, keepdims=True))
        out = (s / s.sum(-1, keepdims=True)) @ v
        return self.linear(out.transpose(1, 0, 2).reshape(T, H * d), f"{p}.o_proj")

    def mlp(self, x: np.ndarray, i: int) -> np.ndarray:
        p = f"model.layers.{i}.mlp"
        g = self.linear(x, p + ".gate_proj")
        if self.gemma:  # gelu_pytorch_tanh
            act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        else:
            act = g / (1 + np.exp(-g))
        return self.linear(act * self.linear(x, p + ".up_proj"), p + ".down_proj")

    def forward(self, ids: np.ndarray) -> np.ndarray:
        mc, luts = self.mc, self.cfg["lut_layers"]
        if "model.embed_tokens" in luts:
            x = self.weff("model.embed_tokens")[ids] * luts["model.embed_tokens"].get("embed_scale", 1.0)
        else:
            x = self.tensor("model.embed_tokens.weight")[ids] * (
                np.float32(mc["hidden_size"] ** 0.5) if self.gemma else 1
            )
        for i in range(mc["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self.attention(self.norm(x, p + ".input_layernorm.weight"), i)
            if self.gemma:
                x = x + self.norm(h, p + ".post_attention_layernorm.weight")
                h = self.mlp(self.norm(x, p + ".pre_feedforward_layernorm.weight"), i)
                x = x + self.norm(h, p + ".post_feedforward_layernorm.weight")
            else:
                x = x + h
                x = x + self.mlp(self.norm(x, p + ".post_attention_layernorm.weight"), i)
        x = self.norm(x, "model.norm.weight")
        logits = self.linear(x, "lm_head") if "lm_head" in luts else x @ self.tensor("lm_head.weight").T
        if mc.get("final_logit_softcapping"):
            logits = np.tanh(logits / mc["final_logit_softcapping"]) * mc["final_logit_softcapping"]
        return logits


# ------------------------------------------------------------------------------------- ane: format
DOC_CONFIG_KEYS = {
    "format",
    "format_version",
    "lutq_version",
    "source",
    "architecture",
    "model_config",
    "forward",
    "index_packing",
    "other_dtype",
    "weights",
    "lut_layers",
    "tensors",
    "tied",
    "quant_layout",
    "size",
}
DOC_LAYER_KEYS = {"kind", "group", "in_features", "out_features", "lut_size", "rank", "index_bits", "bias", "tensors"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def _doc_storage_bits(n: int) -> int:
    """docs/formats.md: 1 for a 2-entry LUT, 2 for 3-4 entries, 4 for 5-16, 8 for 17-256."""
    return 1 if n == 2 else 2 if n <= 4 else 4 if n <= 16 else 8


@pytest.mark.parametrize("name", ["qwen3", "llama_mixed", "gemma3_lut_embed"])
def test_ane_artefact_is_exactly_the_documented_layout(name, tokenizer, tmp_path) -> None:
    model = _variant(name)
    layers = dict(lut_layers(model))
    export(model, tmp_path / "ane", "ane", ExportConfig(verify=False), tokenizer=tokenizer)
    files = {p.name for p in (tmp_path / "ane").iterdir()}
    assert files - {"special_tokens_map.json"} == {"config.json", "model.safetensors"} | TOKENIZER_FILES
    cfg = json.loads((tmp_path / "ane" / "config.json").read_text())
    assert set(cfg) == DOC_CONFIG_KEYS and cfg["weights"] == "model.safetensors"
    assert cfg["architecture"] == model.config.architectures[0] and cfg["other_dtype"] == "float16"
    tensors = load_file(str(tmp_path / "ane" / "model.safetensors"))
    assert set(tensors) == set(cfg["tensors"])
    for tname, entry in cfg["tensors"].items():
        assert set(entry) == {"shape", "dtype", "role", "layer", "packing"}, tname
        assert list(tensors[tname].shape) == entry["shape"] and tensors[tname].dtype.name == entry["dtype"], tname
    assert set(cfg["lut_layers"]) == set(layers)
    for lname, spec in cfg["lut_layers"].items():
        layer = layers[lname]
        out, inp, n, r = layer.out_features, layer.in_features, layer.lut_size, layer.rank
        assert set(spec) >= DOC_LAYER_KEYS and set(spec) - DOC_LAYER_KEYS <= {"embed_scale", "padding_idx"}, lname
        assert (spec["kind"], spec["in_features"], spec["out_features"], spec["lut_size"], spec["rank"]) == (
            layer.kind,
            inp,
            out,
            n,
            r,
        )
        assert spec["group"] == (
            "mlp"
            if ".mlp." in lname
            else "attn"
            if ".self_attn." in lname
            else "lm_head"
            if lname == "lm_head"
            else "embed"
            if lname == "model.embed_tokens"
            else "?"
        )
        assert spec["index_bits"] == math.ceil(math.log2(n)) and spec["bias"] == (layer.bias is not None)
        parts = {"lut", "indices", "scale_ag", "scale_b"} | ({"bias"} if spec["bias"] else set())
        assert spec["tensors"] == {p: f"{lname}.{p}" for p in parts}
        b = _doc_storage_bits(n)
        expect = {
            "lut": ("float16", [n]),
            "indices": ("uint8", [math.ceil(out * inp * b / 8)]),
            "scale_ag": ("float16", [out, r]),
            "scale_b": ("float16", [r, inp]),
            "bias": ("float16", [out]),
        }
        for part in parts:
            entry = cfg["tensors"][f"{lname}.{part}"]
            assert (entry["dtype"], entry["shape"], entry["role"], entry["layer"]) == (*expect[part], part, lname)
            assert (entry["packing"] is None) == (part != "indices")
        pack = cfg["tensors"][f"{lname}.indices"]["packing"]
        assert (pack["bits"], pack["index_bits"], pack["shape"]) == (b, math.ceil(math.log2(n)), [out, inp])
        packed = tensors[f"{lname}.indices"]
        np.testing.assert_array_equal(_unpack(packed, b, [out, inp]), layer.idx.numpy())
        used = (out * inp * b) % 8  # unused high bits of the last byte are zero
        assert used == 0 or int(packed[-1]) >> used == 0, lname
        assert np.all(np.diff(tensors[f"{lname}.lut"].astype(np.float64)) > 0)  # strictly increasing
        if spec["kind"] == "embedding":
            assert spec["embed_scale"] == pytest.approx(float(getattr(layer, "embed_scale", 1.0)))
    roles = {k: e["role"] for k, e in cfg["tensors"].items() if e["layer"] is None}
    for tname, role in roles.items():
        assert tensors[tname].dtype == np.float16, tname
        expected = (
            "embedding"
            if tname == "model.embed_tokens.weight"
            else "lm_head"
            if tname == "lm_head.weight"
            else "norm"
            if "norm" in tname.rsplit(".", 2)[-2]
            else "linear_" + tname.rsplit(".", 1)[1]
        )
        assert role == expected, tname
    tied = model.config.tie_word_embeddings and "model.embed_tokens" not in layers
    assert cfg["tied"] == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    if name == "llama_mixed":  # what the variant is for
        assert {cfg["tensors"][f"{n}.indices"]["packing"]["bits"] for n in layers} == {1, 2, 4, 8}
        assert roles["model.layers.0.self_attn.q_proj.weight"] == "linear_weight"
        assert roles["model.layers.0.self_attn.q_proj.bias"] == "linear_bias"
    if name == "gemma3_lut_embed":
        assert roles["lm_head.weight"] == "lm_head" and cfg["lut_layers"]["model.embed_tokens"]["embed_scale"] == 8.0


# ------------------------------------------------------------------------------------ ane: numerics
@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen3", "llama_mixed", "gemma3", "gemma3_lut_embed"])
def test_numpy_forward_of_the_artefact_reproduces_the_snapped_model(name, tokenizer, tmp_path) -> None:
    model = _variant(name)
    ids = _probe(model)
    snapped = model(ids).logits[0].double().numpy()
    export(model, tmp_path / "ane", "ane", ExportConfig(verify=False), tokenizer=tokenizer)
    art = NumpyArtefact(tmp_path / "ane")
    logits = art.forward(ids[0].numpy())
    for lname in art.cfg["lut_layers"]:  # the factored form is the W_eff form
        x = np.random.default_rng(0).standard_normal((3, art.cfg["lut_layers"][lname]["in_features"]))
        bias = art.t[f"{lname}.bias"].astype(np.float64) if art.cfg["lut_layers"][lname]["bias"] else 0
        np.testing.assert_allclose(art.linear(x, lname), x @ art.weff(lname).T + bias, rtol=1e-9, atol=1e-12)
    scale = np.abs(snapped).max()
    assert np.abs(logits - snapped).max() < 5e-3 * scale  # FP16 dense tensors vs the float32 snapped model
    reloaded, _ = load_ane_artefact(tmp_path / "ane")
    np.testing.assert_allclose(logits, reloaded(ids).logits[0].double().numpy(), rtol=0, atol=1e-5 * scale)
    _round_dense_to_fp16(model)  # docs: exactly the snapped model whose dense tensors are rounded to FP16
    np.testing.assert_allclose(logits, model(ids).logits[0].double().numpy(), rtol=0, atol=1e-5 * scale)


@torch.no_grad()
def test_keep_dtype_artefact_is_bit_exact(tokenizer, tmp_path) -> None:
    model = _variant("gemma3_lut_embed")
    ids = _probe(model)
    res = export(model, tmp_path / "ane", "ane", ExportConfig(keep_dtype=True), tokenizer=tokenizer)
    cfg = read_ane_artefact(tmp_path / "ane").config
    assert cfg["other_dtype"] == "stored" and cfg["tensors"]["model.norm.weight"]["dtype"] == "float32"
    assert res.checks["max_abs_logit_diff"] == 0.0
    reloaded, _ = load_ane_artefact(tmp_path / "ane")
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_size_report_counts_the_dense_rest_at_its_exported_dtype(tokenizer, tmp_path) -> None:
    """docs/export.md: the size report of what is exported, the dense rest at its dtype (FP16 in the artefact)."""
    for keep, width in ((False, 2), (True, 4)):
        model = _variant("qwen3")
        res = export(model, tmp_path / f"ane{keep}", "ane", ExportConfig(keep_dtype=keep, verify=False))
        cfg = json.loads((tmp_path / f"ane{keep}" / "config.json").read_text())
        tensors = load_file(str(tmp_path / f"ane{keep}" / "model.safetensors"))
        dense = [tensors[k] for k, e in cfg["tensors"].items() if e["layer"] is None]
        assert {t.dtype.itemsize for t in dense} == {width}
        dense_bytes = sum(t.nbytes for t in dense)
        for rep in (cfg["size"], res.size["report"]):
            assert rep["other_bytes"] == dense_bytes and rep["other_params"] == sum(t.size for t in dense)
            assert rep["total_bytes"] == math.ceil(rep["quantized"]["bits"] / 8) + dense_bytes
        assert res.size["total"]["size_mb"] == pytest.approx(cfg["size"]["total_bytes"] / 1e6)
        params = res.size["total"]["params"]
        assert res.size["total"]["bits_per_weight"] == pytest.approx(
            (cfg["size"]["quantized"]["bits"] + 8 * dense_bytes) / params
        )


# ------------------------------------------------------------------------------------------------ hf
PLAIN_HF = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    for d, ids in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        out[d] = {"logits": logits.tolist(), "chat": chat, "lutq": any(m.startswith("lutq") for m in sys.modules),
                  "class": type(model).__name__}
    print(json.dumps(out))
""")


@torch.no_grad()
def test_hf_directories_load_with_plain_transformers(tokenizer, tmp_path) -> None:
    from lutq.models import load_model, save_checkpoint

    expected, probes = {}, {}
    for name in ("qwen3", "llama_mixed", "gemma3_lut_embed"):
        model = _variant(name)
        save_checkpoint(tmp_path / f"{name}-ckpt", model, tokenizer)
        source, _ = load_model(tmp_path / f"{name}-ckpt")
        ids = _probe(model)
        expected[str(tmp_path / name)] = source(ids).logits[0]
        probes[str(tmp_path / name)] = ids[0].tolist()
        res = export(tmp_path / f"{name}-ckpt", tmp_path / name, "hf")
        assert res.checks["max_abs_logit_diff"] <= 1e-5
        assert {"tokenizer.json", "tokenizer_config.json", "lutq_export.json"} <= {
            p.name for p in (tmp_path / name).iterdir()
        }
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_HF, json.dumps(probes)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    for d, logits in expected.items():
        assert not got[d]["lutq"] and got[d]["chat"] == chat
        torch.testing.assert_close(torch.tensor(got[d]["logits"]), logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- coreml
def test_coreml_lut_embedding_lm_head_biases_and_odd_luts(tmp_path) -> None:
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import types

    from lutq.export.coreml import PACKAGE, load_package_program

    model = _variant("llama_mixed")
    res = export(model, tmp_path / "cm", "coreml", ExportConfig(seq_len=12))
    assert res.checks["max_abs_weff_diff"] == 0.0 and res.checks["graph_max_abs_logit_diff"] < 1e-4
    prog = load_package_program(tmp_path / "cm" / PACKAGE)
    widths = {
        op.name.removesuffix("_q"): (types.builtin_to_string(op.indices.dtype), op.lut.val.shape)
        for op in prog.functions["main"].operations
        if op.op_type == "constexpr_lut_to_dense"
    }
    assert widths["model_embed_tokens"] == ("uint1", (1, 1, 2, 1))
    assert widths["model_layers_0_mlp_up_proj"] == ("uint2", (1, 1, 4, 1))  # 3 entries, padded to 4
    assert widths["model_layers_1_mlp_up_proj"] == ("uint6", (1, 1, 64, 1))  # 32 entries, padded to 64
    assert widths["model_layers_1_self_attn_q_proj"] == ("uint4", (1, 1, 16, 1))
    assert "model_layers_0_self_attn_q_proj" not in widths  # the full-precision override stays dense
    spec = ct.models.MLModel(str(tmp_path / "cm" / PACKAGE), skip_model_load=True).get_spec()
    assert list(spec.description.output[0].type.multiArrayType.shape) == [1, 12, 321]


def test_coreml_refuses_gemma3_and_writes_nothing(tmp_path) -> None:
    pytest.importorskip("coremltools")
    with pytest.raises(LutqError, match=r"Core ML export supports .*gemma3_text.*--format ane"):
        export(_variant("gemma3"), tmp_path / "cm", "coreml", ExportConfig(seq_len=8))
    assert not (tmp_path / "cm").exists()


# -------------------------------------------------------------------------------- bad input / safety
def _ckpt(path: Path, tokenizer, preset: str | QuantConfig = "q2a4") -> Path:
    from lutq.models import save_checkpoint

    model = tiny_model("qwen3")
    quantize(model, preset, progress=False)
    return save_checkpoint(path, model, tokenizer)


def test_latent_model_is_refused_before_anything_is_snapped(tokenizer, tmp_path) -> None:
    model = tiny_model("llama")
    quantize(model, "q2a4", progress=False)
    layers = dict(lut_layers(model))
    layers["model.layers.1.mlp.down_proj"].unfreeze()  # one latent layer, after frozen ones
    with pytest.raises(LutqError, match=r"model\.layers\.1\.mlp\.down_proj.*latent.*latent-to-frozen"):
        export(model, tmp_path / "ane", "ane", tokenizer=tokenizer)
    assert not any(layer.snapped for layer in layers.values())  # the in-memory model is left as it was
    assert not (tmp_path / "ane").exists()


def test_latent_checkpoint_error_names_the_checkpoint(tokenizer, tmp_path) -> None:
    ckpt = _ckpt(tmp_path / "latent", tokenizer, QuantConfig(mode="latent"))
    for fmt in ("ane", "coreml"):
        with pytest.raises(LutqError, match=rf"{ckpt}.*latent.*lutq convert latent-to-frozen"):
            export(ckpt, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


def test_export_never_replaces_its_own_checkpoint(tokenizer, tmp_path) -> None:
    from lutq.models import load_model

    ckpt = _ckpt(tmp_path / "run" / "best", tokenizer)
    before = (ckpt / "config.json").read_bytes()
    for out in (ckpt, tmp_path / "run", tmp_path / "run" / "best" / ".."):
        with pytest.raises(LutqError, match="checkpoint"):
            export(ckpt, out, "ane")
    assert (ckpt / "config.json").read_bytes() == before
    load_model(ckpt)  # still a checkpoint


def test_export_refuses_an_unrelated_non_empty_directory(tokenizer, tmp_path) -> None:
    from lutq.cli import app

    ckpt = _ckpt(tmp_path / "ckpt", tokenizer)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "mine")])
    assert isinstance(result.exception, LutqError) and "mine" in str(result.exception)
    assert "not empty" in str(result.exception) and "\n" not in str(result.exception)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(LutqError, match="not a directory"):
        export(ckpt, tmp_path / "file", "hf")
    # an empty directory and a previous export (of any format) are replaced
    (tmp_path / "empty").mkdir()
    export(ckpt, tmp_path / "empty", "ane", ExportConfig(verify=False))
    export(ckpt, tmp_path / "empty", "hf", ExportConfig(verify=False))
    assert (tmp_path / "empty" / "lutq_export.json").is_file()
    export(ckpt, tmp_path / "empty", "ane", ExportConfig(verify=False))
    assert read_ane_artefact(tmp_path / "empty").config["format"] == "lutq-ane"
    assert not (tmp_path / "empty" / "lutq_export.json").exists()


def test_interrupted_write_keeps_the_previous_artefact(tokenizer, tmp_path, monkeypatch) -> None:
    import lutq.export.ane as ane

    ckpt = _ckpt(tmp_path / "ckpt", tokenizer)
    export(ckpt, tmp_path / "ane", "ane", ExportConfig(verify=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ane").iterdir()}

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ane, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, tmp_path / "ane", "ane", ExportConfig(keep_dtype=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ane").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ane", "ckpt"]  # no temporary directory left


KILLED = textwrap.dedent("""
    import sys, time
    import lutq.export.ane as ane
    from lutq.export import export

    real = ane.save_file
    def slow(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("WRITTEN", flush=True)
        time.sleep(60)
    ane.save_file = slow
    export(sys.argv[1], sys.argv[2], "ane")
""")


def test_killed_export_keeps_the_previous_artefact(tokenizer, tmp_path) -> None:
    ckpt = _ckpt(tmp_path / "ckpt", tokenizer)
    export(ckpt, tmp_path / "ane", "ane", ExportConfig(verify=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ane").iterdir()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(ckpt), str(tmp_path / "ane")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITTEN", proc.stderr.read()[-2000:] if proc.poll() is not None else line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ane").iterdir()} == before
    load_ane_artefact(tmp_path / "ane")
    export(ckpt, tmp_path / "ane", "ane", ExportConfig(verify=False))  # the next export still works


def test_wrong_format_and_newer_version_are_clear_errors(tokenizer, tmp_path) -> None:
    from lutq.cli import app

    result = CliRunner().invoke(app, ["export", "--format", "onnx", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert isinstance(result.exception, LutqError)
    assert str(result.exception) == "export format 'onnx': choose one of ane, hf, coreml"
    assert not (tmp_path / "x").exists()
    model = _variant("qwen3")
    export(model, tmp_path / "ane", "ane", ExportConfig(verify=False))
    cfg = json.loads((tmp_path / "ane" / "config.json").read_text())
    (tmp_path / "ane" / "config.json").write_text(json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(LutqError, match=r"config\.json: format_version 2 is newer"):
        load_ane_artefact(tmp_path / "ane")
