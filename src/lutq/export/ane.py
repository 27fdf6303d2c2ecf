"""The ANE artefact: the FP16-snapped factored model as plain tensors plus a config.json that describes
every tensor (docs/formats.md is the specification; keep the two in step).

Per LUT layer L (W_eff = lut[idx] ⊙ (scale_ag @ scale_b), y = W_eff x + bias):
  L.lut       float16 [n]                   the LUT
  L.indices   uint8   [ceil(out·in·b/8)]    idx [out, in] packed by lutq.quant.lut.pack_indices
  L.scale_ag  float16 [out, r]              Â·diag(g), baked
  L.scale_b   float16 [r, in]               B̂
  L.bias      float16 [out]                 only when the layer has a bias
Every other tensor keeps its state_dict name (float16 by default, or its stored dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lutq import __version__
from lutq.core.atomic import atomic_dir, atomic_write_json
from lutq.core.errors import LutqError
from lutq.core.formats import read_versioned_json

FORMAT = "lutq-ane"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
FORWARD = (
    "y = sum_k scale_ag[:, k] * (Q @ (scale_b[k, :] * x)) + bias  ==  (Q * (scale_ag @ scale_b)) @ x + bias, "
    "Q = lut[unpack(indices)]"
)
PACKING = (
    "indices [out, in] flattened row-major (element (o, i) is number j = o*in + i), b = storage bits; "
    "element j sits in byte j // (8 / b) at bit offset (j % (8 / b)) * b, least significant bits first; "
    "the last byte is zero-padded; b = 8 stores one index per byte"
)
LUT_PARTS = ("lut", "indices", "scale_ag", "scale_b", "bias")


@dataclass
class AneArtefact:
    """In memory: config (what config.json holds) and tensors (name -> tensor) of the artefact."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _unpacked: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def lut_layers(self) -> dict[str, dict[str, Any]]:
        return self.config["lut_layers"]

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor by name, following `tied` aliases (e.g. lm_head.weight -> model.embed_tokens.weight)."""
        name = self.config.get("tied", {}).get(name, name)
        if name not in self.tensors:
            raise LutqError(f"ANE artefact: tensor {name!r} missing")
        return self.tensors[name]

    def q_indices(self, layer: str) -> torch.Tensor:
        """The unpacked uint8 indices [out, in] of a LUT layer."""
        from lutq.quant.lut import unpack_indices

        if layer not in self._unpacked:
            spec = self.config["tensors"][f"{layer}.indices"]["packing"]
            self._unpacked[layer] = unpack_indices(self.tensors[f"{layer}.indices"], spec["bits"], tuple(spec["shape"]))
        return self._unpacked[layer]

    def effective_weight(self, layer: str) -> torch.Tensor:
        """W_eff = lut[idx] ⊙ (scale_ag @ scale_b) in float32, exactly as the artefact defines it."""
        lut = self.tensors[f"{layer}.lut"].float()
        s = self.tensors[f"{layer}.scale_ag"].float() @ self.tensors[f"{layer}.scale_b"].float()
        return lut[self.q_indices(layer).long()] * s


# ------------------------------------------------------------------------------------------- building
def _role(name: str, module: nn.Module | None) -> str:
    from lutq.quant.presets import group_of

    module_name = name.rpartition(".")[0]
    if group_of(module_name) == "embed":
        return "embedding"
    if group_of(module_name) == "lm_head":
        return "lm_head"
    if "norm" in module_name.rpartition(".")[2]:
        return "norm"
    if isinstance(module, nn.Linear):
        return "linear_" + name.rpartition(".")[2]
    return "other"


def _tensor_entry(t: torch.Tensor, role: str, **extra: Any) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "role": role, **extra}


def build_ane_artefact(model: nn.Module, *, keep_dtype: bool = False, source: str = "") -> AneArtefact:
    """The artefact of a snapped lutq model (tensors on the CPU). Non-LUT tensors become float16 unless
    keep_dtype. Raises LutqError for an unsnapped or latent model."""
    from lutq.models.checkpoint import dedupe_tied
    from lutq.quant import storage
    from lutq.quant.api import lut_layers
    from lutq.quant.lut import index_bits, pack_indices, storage_bits
    from lutq.quant.presets import group_of

    layers = dict(lut_layers(model))
    if not layers:
        raise LutqError("ANE export: the model has no LUT layers (quantize it first: lutq quant / lutq train)")
    if not storage.is_snapped(model):
        raise LutqError("ANE export: the model is not snapped to FP16 (run lutq.quant.snap_model first)")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    lut_cfg: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        if layer.mode != "frozen":
            raise LutqError(f"ANE export: layer {name} is in {layer.mode!r} mode; freeze it first")
        ag, b = (t.detach().cpu() for t in layer.scales())
        bits = index_bits(layer.lut_size)
        packed = pack_indices(layer.idx, bits)
        parts = {"lut": layer.lut.detach().cpu(), "indices": packed, "scale_ag": ag, "scale_b": b}
        if layer.bias is not None:
            parts["bias"] = layer.bias.detach().cpu()
        for part, t in parts.items():
            if part != "indices":
                half = t.to(torch.float16)
                if not torch.equal(half.float(), t.float()):
                    raise LutqError(f"ANE export: {name}.{part} is not FP16-exact (snap the model again)")
                t = half
            tensors[f"{name}.{part}"] = t.contiguous()
            extra: dict[str, Any] = {"layer": name, "packing": None}
            if part == "indices":
                extra["packing"] = {
                    "bits": storage_bits(bits),
                    "index_bits": bits,
                    "shape": [layer.out_features, layer.in_features],
                    "order": "row-major, lsb-first",
                }
            entries[f"{name}.{part}"] = _tensor_entry(t, part, **extra)
        lut_cfg[name] = {
            "kind": layer.kind,
            "group": group_of(name),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "lut_size": layer.lut_size,
            "rank": layer.rank,
            "index_bits": bits,
            "bias": layer.bias is not None,
            **(
                {"embed_scale": layer.embed_scale, "padding_idx": layer.padding_idx}
                if layer.kind == "embedding"
                else {}
            ),
            "tensors": {p: f"{name}.{p}" for p in parts},
        }
    lut_keys = {f"{n}.{p}" for n in layers for p in (*LUT_PARTS, "idx", "scale_A", "scale_B", "scale_g")}
    rest = {k: v.detach() for k, v in model.state_dict().items() if k not in lut_keys}
    rest, tied = dedupe_tied(rest)
    modules = dict(model.named_modules())
    for k, v in rest.items():
        t = v.cpu() if keep_dtype or not v.is_floating_point() else v.cpu().to(torch.float16)
        tensors[k] = t.contiguous()
        entries[k] = _tensor_entry(t, _role(k, modules.get(k.rpartition(".")[0])), layer=None, packing=None)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lutq_version": __version__,
        "source": source,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_config": _model_config(model),
        "forward": FORWARD,
        "index_packing": PACKING,
        "other_dtype": "stored" if keep_dtype else "float16",
        "weights": WEIGHTS,
        "lut_layers": lut_cfg,
        "tied": tied,
        "tensors": entries,
        "quant_layout": storage.quant_layout(model),
        "size": _size_report(model, tensors, entries),
    }
    return AneArtefact(config, tensors)


def _size_report(model: nn.Module, tensors: dict[str, torch.Tensor], entries: dict[str, Any]) -> dict[str, Any]:
    """`storage.size_report(model)` with the dense rest counted as the artefact stores it (FP16 by default)."""
    from lutq.quant import storage

    report = storage.size_report(model)
    dense = [t for name, t in tensors.items() if entries[name]["layer"] is None]
    report["other_params"] = sum(t.numel() for t in dense)
    report["other_bytes"] = sum(t.numel() * t.element_size() for t in dense)
    report["total_bytes"] = math.ceil(report["quantized"]["bits"] / 8) + report["other_bytes"]
    report["disk_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    return report


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return config


def write_ane_artefact(artefact: AneArtefact, out: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) as one directory, atomically."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(artefact.tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "config.json", artefact.config)
    return out


# -------------------------------------------------------------------------------------------- reading
def read_ane_artefact(path: str | Path) -> AneArtefact:
    """Parse and check an artefact directory (config.json + weights); errors name the file and problem."""
    path = Path(path)
    config = read_versioned_json(
        path / "config.json", format=FORMAT, max_version=FORMAT_VERSION, what="lutq ANE artefact"
    )
    wpath = path / config.get("weights", WEIGHTS)
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LutqError(f"{wpath}: missing, corrupt or truncated ({e})") from e
    for name, entry in config.get("tensors", {}).items():
        if name not in tensors:
            raise LutqError(f"{wpath}: tensor {name!r} described in config.json is missing")
        if list(tensors[name].shape) != entry["shape"]:
            raise LutqError(f"{wpath}: {name} has shape {list(tensors[name].shape)}, config.json says {entry['shape']}")
    return AneArtefact(config, tensors)


def model_from_artefact(art: AneArtefact, *, where: str = "ANE artefact") -> nn.Module:
    """The snapped lutq model (float32, CPU, eval) that an artefact describes."""
    from lutq.models.checkpoint import CheckpointInfo, build_base_model
    from lutq.quant import storage
    from lutq.quant.api import lut_layers

    info = CheckpointInfo(
        path=Path(where), architecture=art.config["architecture"], base_config=art.config["model_config"]
    )
    model = build_base_model(info)
    storage.apply_quant_layout(model, art.config["quant_layout"])
    state: dict[str, torch.Tensor] = {}
    for name, spec in art.lut_layers.items():
        state[f"{name}.lut"] = art.tensors[f"{name}.lut"].float()
        state[f"{name}.idx"] = art.q_indices(name).clone()
        state[f"{name}.scale_A"] = art.tensors[f"{name}.scale_ag"].float()
        state[f"{name}.scale_B"] = art.tensors[f"{name}.scale_b"].float()
        state[f"{name}.scale_g"] = torch.ones(spec["rank"])
        if spec["bias"]:
            state[f"{name}.bias"] = art.tensors[f"{name}.bias"].float()
    lut_tensors = {t for spec in art.lut_layers.values() for t in spec["tensors"].values()}
    expected = model.state_dict()
    for k, v in art.tensors.items():
        if k not in lut_tensors:
            state[k] = v.to(expected[k].dtype) if k in expected else v
    for alias, target in art.config.get("tied", {}).items():
        state[alias] = state[target]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LutqError(f"{where}: tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=True, assign=True)
    for _, layer in lut_layers(model):
        layer.snapped = True
    if getattr(model.config, "tie_word_embeddings", False) and art.config.get("tied"):
        model.tie_weights()
    return model.eval()


def load_ane_artefact(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Rebuild a snapped lutq model (and tokenizer, if present) from an ANE artefact directory."""
    path = Path(path)
    model = model_from_artefact(read_ane_artefact(path), where=str(path))
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(dtype=dtype, device=device).eval(), tokenizer
