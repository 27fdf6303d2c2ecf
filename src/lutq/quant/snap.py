"""Snap a LUT model to FP16 for the ANE (DESIGN.md "Snap").

Per layer, on the CPU: the LUT, the baked Â·g, B̂ and the bias are rounded to FP16; idx is re-picked as
nearest(W_target / S₁₆) against the FP16 scales, with W_target the pre-snap W_eff; then scale_A ← Â·g,
scale_B ← B̂, scale_g ← 1 and `snapped = True`. The tensors stay in the model's dtype (float32) holding
FP16-exact values, so training code and the forward need no special case; checkpoints store them as
FP16 (lutq.quant.storage), bit-exact. Snapping a snapped layer changes nothing (bitwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lutq.core.errors import LutqError
from lutq.quant.api import lut_layers
from lutq.quant.layer import LUTLinear
from lutq.quant.lut import nearest_index, repair_lut, round_fp16

_TINY = 1e-30  # |S| below this: keep the current index (W_target / S is meaningless there)


@dataclasses.dataclass
class SnapReport:
    """Per-layer index changes and the probe-batch logit error of the snapped vs. unsnapped model."""

    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    probe_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        changed = sum(r["idx_changed"] for r in self.layers)
        total = sum(r["numel"] for r in self.layers)
        return (
            f"snapped {len(self.layers)} layers; {changed}/{total} indices re-picked; probe {self.probe_shape}: "
            f"max |Δlogit| {self.max_abs_error:.4g}, ‖Δ‖/‖logits‖ {self.rel_error:.4g}"
        )


@torch.no_grad()
def snap_layer_(layer: LUTLinear) -> dict[str, Any]:
    """Round LUT, Â·g, B̂ and bias to FP16, re-pick idx toward the pre-snap W_eff, bake; returns stats."""
    if layer.mode == "latent":
        raise LutqError("snap: a latent layer has no fixed indices; run `lutq convert latent-to-frozen` first")
    device = layer.scale_A.device
    ste, layer.ste_fp16 = layer.ste_fp16, False
    target = (layer.q() * layer.scale_map()).cpu().float()
    a, b = (t.detach().cpu().float() for t in layer.scales())
    layer.ste_fp16 = ste
    a16, b16 = round_fp16(a), round_fp16(b)
    lut16 = repair_lut(layer.lut.detach().cpu())
    s16 = a16 @ b16
    old = layer.idx.detach().cpu()
    idx = nearest_index(target / s16.where(s16.abs() > _TINY, torch.ones_like(s16)), lut16)
    if not torch.equal(lut16, layer.lut.detach().cpu().float()):
        old = nearest_index(torch.take(layer.lut.detach().cpu().float(), old.long()), lut16)
    idx = torch.where(s16.abs() > _TINY, idx, old)
    layer.lut.copy_(lut16.to(layer.lut))
    layer.scale_A.copy_(a16.to(device))
    layer.scale_B.copy_(b16.to(device))
    layer.scale_g.fill_(1.0)
    if layer.bias is not None:
        layer.bias.copy_(round_fp16(layer.bias.detach().cpu().float()).to(device))
    changed = int((idx != layer.idx.detach().cpu()).sum())
    layer.idx.copy_(idx.to(device))
    layer.snapped = True
    for p in layer.parameters():
        p.requires_grad_(False)
    return {"idx_changed": changed, "numel": idx.numel()}


def _default_probe(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def snap_model(model: nn.Module, probe_input_ids: torch.Tensor | None = None) -> SnapReport:
    """Snap every LUT layer to FP16 (in place) and verify logits on a probe batch (default: 2×32 random ids)."""
    layers = list(lut_layers(model))
    if not layers:
        raise LutqError("snap: the model has no LUT layers")
    latent = [name for name, layer in layers if layer.mode == "latent"]
    if latent:  # checked for all layers first: snapping in place must not stop half-way
        more = f" (and {len(latent) - 1} more)" if len(latent) > 1 else ""
        raise LutqError(
            f"snap: LUT layer {latent[0]}{more} is latent, with no fixed indices; run `lutq convert "
            "latent-to-frozen` first (nothing was snapped)"
        )
    device = next(model.parameters()).device
    probe = (_default_probe(model) if probe_input_ids is None else probe_input_ids).to(device)
    was_training = model.training
    model.eval()
    before = model(probe).logits.float()
    if not before.isfinite().all():
        model.train(was_training)
        raise LutqError(
            "snap: the model's logits on the probe batch are not finite before snapping (NaN/inf "
            "weights?); nothing was snapped"
        )
    report = SnapReport(probe_shape=tuple(probe.shape))
    for name, layer in layers:
        report.layers.append({"name": name, **snap_layer_(layer)})
    after = model(probe).logits.float()
    model.train(was_training)
    diff = after - before
    report.max_abs_error = float(diff.abs().max())
    report.rel_error = float(diff.norm() / before.norm().clamp_min(1e-30))
    return report
