"""Checkpoint hooks for LUT models (called by lutq.models.save_checkpoint / load_checkpoint) and sizes.

On disk, per LUT layer `<name>`:
  <name>.idx_packed  uint8, indices packed 8/b per byte (b = 1, 2, 4 or 8 bits; lutq.quant.lut.pack_indices)
  <name>.lut, .scale_A, .scale_B, .scale_g, .bias   model dtype; FP16 once the layer is snapped (exact)
  <name>.latent      only for latent layers (the trainable latent weights, in units of the scale map: W / S)
The per-layer shapes and flags travel in config.json["quant"] (`quant_layout`); loading rebuilds the
LUT modules from it (`apply_quant_layout`) before the tensors are decoded (`decode_state`).

Size of one LUT layer with N = out·in weights, a LUT of n entries and rank r, FP16 scales:
  bits = N·b + 16·n + 16·r·(out + in + 1) [+ 16·out with a bias],  b = storage_bits(ceil(log2 n))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lutq.core.errors import LutqError
from lutq.quant.api import lut_layers, quant_config_of, replace_module
from lutq.quant.layer import LUTLinear, build_from_layout
from lutq.quant.lut import index_bits, is_fp16_exact, pack_indices, storage_bits, unpack_indices
from lutq.quant.presets import QuantConfig, group_of

LAYOUT_VERSION = 1
_FP16_WHEN_SNAPPED = ("lut", "scale_A", "scale_B", "scale_g", "bias")


def quant_layout(model: nn.Module) -> dict[str, Any]:
    """JSON-able description of the model's LUT layers (and the QuantConfig, when known)."""
    cfg = quant_config_of(model)
    return {
        "version": LAYOUT_VERSION,
        "config": None if cfg is None else cfg.to_dict(),
        "layers": {name: layer.layout() for name, layer in lut_layers(model)},
    }


def apply_quant_layout(model: nn.Module, layout: dict[str, Any]) -> nn.Module:
    """Replace the named linears / embeddings of a freshly built base model by empty LUT layers."""
    version = layout.get("version")
    if version != LAYOUT_VERSION:
        raise LutqError(f"config.json quant.version is {version!r}; this lutq reads version {LAYOUT_VERSION}")
    for name, spec in (layout.get("layers") or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise LutqError(f"config.json quant.layers: model has no module {name!r}") from e
        if not isinstance(spec, dict):
            raise LutqError(f"config.json quant.layers[{name!r}]: expected an object, got {spec!r}")
        shape = (spec.get("out_features"), spec.get("in_features"))
        if not isinstance(module, nn.Linear | nn.Embedding) or tuple(module.weight.shape) != shape:
            raise LutqError(
                f"config.json quant.layers[{name!r}]: expected a linear/embedding of shape {shape}, "
                f"found {type(module).__name__} {tuple(getattr(module, 'weight', torch.empty(0)).shape)}"
            )
        try:
            layer = build_from_layout(spec, device=module.weight.device, dtype=module.weight.dtype)
        except (KeyError, TypeError) as e:
            raise LutqError(f"config.json quant.layers[{name!r}]: malformed layer layout ({e!r})") from e
        replace_module(model, name, layer)
    if layout.get("config"):
        model.lutq_config = QuantConfig.from_dict(layout["config"], source="config.json quant.config")
    return model


def encode_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict -> tensors to write: packed indices; FP16 scales for snapped layers (values are FP16-exact)."""
    out = dict(state)
    for name, layer in lut_layers(model):
        p = f"{name}."
        out[p + "idx_packed"] = pack_indices(out.pop(p + "idx"), index_bits(layer.lut_size))
        if layer.snapped:
            for key in _FP16_WHEN_SNAPPED:
                t = out.get(p + key)
                if t is not None and t.dtype == torch.float32 and is_fp16_exact(t):
                    out[p + key] = t.to(torch.float16)
    return out


def decode_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of encode_state for a model with the layout applied: unpack indices, restore dtypes."""
    out = dict(tensors)
    for name, layer in lut_layers(model):
        p = f"{name}."
        packed = out.pop(p + "idx_packed", None)
        if packed is None:
            raise LutqError(f"model.safetensors: missing {p}idx_packed for LUT layer {name}")
        out[p + "idx"] = unpack_indices(packed, index_bits(layer.lut_size), (layer.out_features, layer.in_features))
        layer.upgrade_state_(out, p)  # old latent checkpoints: W as `weight` -> W / S as `latent`
        for key, ref in layer.state_dict().items():
            t = out.get(p + key)
            if t is not None and t.dtype != ref.dtype and t.is_floating_point() and ref.is_floating_point():
                out[p + key] = t.to(ref.dtype)
    return out


def is_snapped(model: nn.Module) -> bool:
    """True when the model has LUT layers and every one of them is snapped to FP16."""
    layers = [layer for _, layer in lut_layers(model)]
    return bool(layers) and all(layer.snapped for layer in layers)


# ------------------------------------------------------------------------------------------------- sizes
def layer_bits(layer: LUTLinear) -> dict[str, int]:
    """The size formula for one LUT layer, in bits (FP16 LUT, scales and bias)."""
    out, n_in, r = layer.out_features, layer.in_features, layer.rank
    return {
        "weights": out * n_in,
        "index_bits": out * n_in * storage_bits(index_bits(layer.lut_size)),
        "lut_bits": 16 * layer.lut_size,
        "scale_bits": 16 * r * (out + n_in + 1),
        "bias_bits": 16 * out if layer.bias is not None else 0,
    }


def size_report(model: nn.Module) -> dict[str, Any]:
    """Bits per weight per group and overall (formula above), plus the exact on-disk tensor bytes.

    Works on meta-device models (shapes only), so the size of a big model can be computed without weights.
    """
    groups: dict[str, dict[str, int]] = {}
    lut_prefixes = []
    for name, layer in lut_layers(model):
        g = groups.setdefault(group_of(name) or "other", {})
        for k, v in layer_bits(layer).items():
            g[k] = g.get(k, 0) + v
        g["layers"] = g.get("layers", 0) + 1
        lut_prefixes.append((name + ".", layer))
    total = {
        k: sum(g.get(k, 0) for g in groups.values())
        for k in ("layers", "weights", "index_bits", "lut_bits", "scale_bits", "bias_bits")
    }
    for g in (*groups.values(), total):
        bits = g["index_bits"] + g["lut_bits"] + g["scale_bits"] + g["bias_bits"]
        g["bits"] = bits
        g["bits_per_weight"] = bits / g["weights"] if g["weights"] else 0.0
    other_params, other_bytes, disk_bytes, dense_params = 0, 0, 0, 0
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue  # tied alias: stored once
        seen.add(id(t))
        owner = next(((p, layer) for p, layer in lut_prefixes if key.startswith(p)), None)
        if owner is None:
            other_params += t.numel()
            other_bytes += t.numel() * t.element_size()
            disk_bytes += t.numel() * t.element_size()
            dense_params += t.numel()
            continue
        prefix, layer = owner
        leaf = key[len(prefix) :]
        if leaf == "idx":
            disk_bytes += math.ceil(t.numel() * storage_bits(index_bits(layer.lut_size)) / 8)
            dense_params += t.numel()
        elif layer.snapped and leaf in _FP16_WHEN_SNAPPED and t.dtype == torch.float32:
            disk_bytes += 2 * t.numel()
        else:
            disk_bytes += t.numel() * t.element_size()
    return {
        "groups": groups,
        "quantized": total,
        "other_params": other_params,
        "other_bytes": other_bytes,
        "total_bytes": math.ceil(total["bits"] / 8) + other_bytes,
        "disk_bytes": disk_bytes,
        "dense_params": dense_params,
    }
