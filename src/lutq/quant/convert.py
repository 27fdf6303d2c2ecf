"""Conversions between LUT models: Q4 → Q2 (DESIGN.md "Conversions") and latent → frozen.

Q4 → Q2 needs no FP weight: the target of every converted layer is its current (q4) W_eff. Per layer:
  LUT   when the target LUT is smaller, weighted k-means of the current entries, each weighted by
        Σ S² over the weights that use it (usage count × mean S²): exactly the least-squares LUT for
        fixed S and the current assignment;
  rank  expanded with random directions orthogonal to the current ones and small g (1e-3 · min g);
  idx   re-picked as nearest(W_target / S) in the new LUT; optional tighten rounds refit the scales;
        with calibration Hessians (`lutq.quant.calibrate`, collected on the q4 model) idx is then
        re-picked by GPTQ against the layer's real inputs (with one output-metric refit of the scales).
With Hessians and an activation power p > 0 (the model's QuantConfig.init_act_power unless given), input
column j weighs (H_jj / mean H_jj)^p in the LUT reduction and the tighten refits, as in `quantize`.
The report's rel_error is ‖W_eff(q2) − W_eff(q4)‖ / ‖W_eff(q4)‖ (out_error: the same on the outputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lutq.core.errors import LutqError
from lutq.quant.api import QuantReport, QuantRow, lut_layers, quant_config_of, replace_module
from lutq.quant.calibrate import DEFAULT_DAMP, calibrate_layer_, column_weights
from lutq.quant.init import _orthonormal_extension, relative_error, repick_indices_, tighten_
from lutq.quant.layer import LUTEmbedding, LUTLinear
from lutq.quant.lut import kmeans_lut
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES, CalibSource, LayerSpec, group_of

NEW_G = 1e-3  # new directions start at NEW_G · min(g) so the converted W_eff barely moves


@torch.no_grad()
def usage_weights(layer: LUTLinear, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ S² (× the input column's weight, if given) over the weights that use each LUT entry [lut_size]."""
    s2 = layer.scale_map().detach().float().pow(2)
    if col_weight is not None:
        s2 = s2 * col_weight.to(s2)[None, :]
    return torch.zeros(layer.lut_size, device=s2.device).index_add_(0, layer.idx.reshape(-1).long(), s2.reshape(-1))


@torch.no_grad()
def convert_layer(
    layer: LUTLinear,
    lut_size: int,
    rank: int,
    *,
    tighten_rounds: int = 0,
    hessian: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
    act_power: float = 0.0,
) -> tuple[LUTLinear, float, float | None]:
    """A new frozen layer with `lut_size` entries (when smaller) and rank >= `rank`, fitted to layer's W_eff;
    returns (layer, weight error, output error or None without a Hessian). With a Hessian and `act_power` > 0
    the LUT reduction and the tighten refits weigh input columns by `column_weights(hessian, act_power)`."""
    if layer.snapped:
        raise LutqError("convert: layers must be unsnapped (convert before `lutq snap`)")
    layer.freeze()  # a latent layer's target is what its forward computes: idx = nearest(weight / S)
    target = (layer.q() * layer.scale_map()).detach()
    lut = layer.lut.detach()
    use_cw = hessian is not None and act_power > 0 and not isinstance(layer, LUTEmbedding)
    col_weight = column_weights(hessian, act_power).to(target.device) if use_cw else None
    if lut_size < layer.lut_size:
        lut = kmeans_lut(lut, usage_weights(layer, col_weight), lut_size)
    new_rank = max(rank, layer.rank)
    dev, dtype = layer.scale_A.device, layer.scale_A.dtype
    if isinstance(layer, LUTEmbedding):
        new: LUTLinear = LUTEmbedding(
            layer.out_features,
            layer.in_features,
            lut.numel(),
            new_rank,
            lut=lut,
            padding_idx=layer.padding_idx,
            embed_scale=layer.embed_scale,
            device=dev,
            dtype=dtype,
            ste_fp16=layer.ste_fp16,
        )
    else:
        new = LUTLinear(
            layer.in_features,
            layer.out_features,
            lut.numel(),
            new_rank,
            bias=layer.bias is not None,
            lut=lut,
            ste_fp16=layer.ste_fp16,
            factored=layer.factored,
            eps=layer.eps,
            device=dev,
            dtype=dtype,
        )
    a = layer.scale_A.detach() / layer.scale_A.detach().norm(dim=0).clamp_min(layer.eps)
    b = layer.scale_B.detach() / layer.scale_B.detach().norm(dim=1, keepdim=True).clamp_min(layer.eps)
    g = layer.scale_g.detach()
    extra = new_rank - layer.rank
    if extra:
        gen = torch.Generator().manual_seed(new_rank * 7919 + layer.out_features)
        a = torch.cat([a, _orthonormal_extension(a.double().cpu(), extra, gen).to(a)], dim=1)
        b = torch.cat([b, _orthonormal_extension(b.t().double().cpu(), extra, gen).t().to(b)], dim=0)
        g = torch.cat([g, g.new_full((extra,), NEW_G * float(g.abs().min()))])
    new.scale_A.copy_(a)
    new.scale_B.copy_(b)
    new.scale_g.copy_(g)
    if layer.bias is not None:
        new.bias.copy_(layer.bias.detach())
    repick_indices_(new, target)
    tighten_(new, target, tighten_rounds, col_weight)
    out_err = None
    if hessian is not None and not isinstance(new, LUTEmbedding):
        out_err = calibrate_layer_(new, target, hessian, damp=damp)
    return new, relative_error(new, target), out_err


def resolve_act_power(model: nn.Module, act_power: float | None) -> float:
    """The activation power a conversion uses: `act_power`, else the model's QuantConfig.init_act_power (0 if
    the model has no config); rejects a negative one."""
    if act_power is None:
        cfg = quant_config_of(model)
        act_power = cfg.init_act_power if cfg is not None else 0.0
    if not act_power >= 0:
        raise LutqError(f"convert q4→q2: act_power must be >= 0, got {act_power}")
    return act_power


def convert_q4_to_q2(
    model: nn.Module,
    mlp: tuple[int, int] = (4, 32),
    attn: tuple[int, int] = (16, 8),
    *,
    tighten_rounds: int = 0,
    hessians: Mapping[str, torch.Tensor] | None = None,
    damp: float = DEFAULT_DAMP,
    act_power: float | None = None,
) -> QuantReport:
    """Convert a q4 LUT model in place to (lut_size, rank) targets per group (default q2a4); returns errors.

    `hessians` ({layer name: H}, e.g. `collect_hessians(model, blocks)` on this q4 model) adds GPTQ
    index picking to the layers that have one, and the activation-aware LUT reduction with power `act_power`
    (default: the model's QuantConfig.init_act_power; 0 turns it off)."""
    act_power = resolve_act_power(model, act_power)
    targets = {"mlp": mlp, "attn": attn}
    _check_targets(model, targets)
    report = QuantReport(title=f"convert q4 → q2 (mlp {mlp}, attn {attn}); error vs. the q4 W_eff")
    for name, layer in list(lut_layers(model)):
        group = group_of(name) or "other"
        if group not in targets:
            continue
        lut_size, rank = targets[group]
        hessian = None if hessians is None else hessians.get(name)
        new, err, out_err = convert_layer(
            layer, lut_size, rank, tighten_rounds=tighten_rounds, hessian=hessian, damp=damp, act_power=act_power
        )
        replace_module(model, name, new)
        report.rows.append(
            QuantRow(
                name,
                group,
                (new.out_features, new.in_features),
                new.lut_size,
                new.rank,
                "kmeans" if new.lut_size < layer.lut_size else "kept",
                err,
                out_err,
            )
        )
    if not report.rows:
        raise LutqError("convert q4→q2: the model has no mlp/attn LUT layers")
    cfg = quant_config_of(model)
    if cfg is not None:
        cfg.mlp, cfg.attn = LayerSpec(*mlp, cfg.mlp.lut_kind), LayerSpec(*attn, cfg.attn.lut_kind)
        cfg.preset = "q2a4" if (mlp, attn) == ((4, 32), (16, 8)) else None
    return report


def _check_targets(model: nn.Module, targets: dict[str, tuple[int, int]]) -> None:
    """Refuse, before any layer is replaced, a LUT that would have to grow (a conversion only reduces LUTs) and a
    model already at the targets (a q2 checkpoint given for a q4 one: the conversion would change nothing)."""
    changes = 0
    for name, layer in lut_layers(model):
        group = group_of(name) or "other"
        if group not in targets:
            continue
        lut_size, rank = targets[group]
        if layer.lut_size < lut_size:
            raise LutqError(
                f"convert q4→q2: {name} has a {layer.lut_size}-entry LUT; a conversion only reduces LUTs and "
                f"cannot grow it to {lut_size} (is the input the q4 checkpoint?)"
            )
        changes += layer.lut_size > lut_size or layer.rank < rank
    if not changes and any(group_of(n) in targets for n, _ in lut_layers(model)):
        raise LutqError(
            f"convert q4→q2: every mlp/attn layer is already at the targets (mlp {targets['mlp']}, attn "
            f"{targets['attn']}: LUT size, rank); nothing to convert (is the input the q4 checkpoint?)"
        )


def unfreeze_latent(model: nn.Module) -> int:
    """Frozen → latent for every frozen, unsnapped LUT layer (FP weight = W_eff, idx unchanged); returns how many."""
    n = 0
    for _, layer in lut_layers(model):
        if layer.mode == "frozen" and not layer.snapped:
            layer.unfreeze()
            n += 1
    if n and (cfg := quant_config_of(model)) is not None:
        cfg.mode = "latent"
    return n


def freeze_latent(model: nn.Module) -> int:
    """Latent → frozen for every latent LUT layer (idx fixed, FP weight dropped); returns how many."""
    n = 0
    for _, layer in lut_layers(model):
        if layer.mode == "latent":
            layer.freeze()
            n += 1
    if n and (cfg := quant_config_of(model)) is not None:
        cfg.mode = "frozen"
    return n


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    mlp: tuple[int, int] = (4, 32),
    attn: tuple[int, int] = (16, 8),
    *,
    tighten_rounds: int = 0,
    calib: CalibSource | None = None,
    calib_sequences: int = CALIB_SEQUENCES,
    calib_len: int = CALIB_LEN,
    reference: str | None = None,
    blockwise: Any = None,
    act_power: float | None = None,
    device: str = "cpu",
    show: bool = True,
) -> QuantReport:
    """Load the q4 LUT checkpoint `src`, `convert_q4_to_q2` it, save it as `dst`; returns the report (also in
    dst's config). With `calib` (a KD cache or a data source): GPTQ indices from Hessians of the q4 model
    itself or, given the FP `reference` model (a spec for `load_model`), block-wise calibration against it
    (`lutq.quant.reconstruct`; `blockwise` is a ReconstructConfig). `act_power`: see `convert_q4_to_q2`. The
    work runs on `device` ("auto": CUDA when present); the checkpoint is written from the CPU either way."""
    import json

    from lutq.core.console import console
    from lutq.core.device import resolve_device
    from lutq.models import load_checkpoint, load_model, save_checkpoint
    from lutq.models.checkpoint import check_checkpoint_out
    from lutq.quant.calibrate import calibration_blocks, hessians_for
    from lutq.quant.reconstruct import ReconstructConfig, reconstruct_

    if reference is not None and calib is None:
        raise LutqError("convert: a reference model calibrates on data; pass calib too")
    check_checkpoint_out(dst, src)
    dev = resolve_device(device)
    model, tokenizer, info = load_checkpoint(src, device=dev)
    if not any(True for _ in lut_layers(model)):
        raise LutqError(f"{src}: not a LUT checkpoint (no quantized layers); run `lutq quantize` first")
    hessians = None
    if calib is not None and reference is None:
        names = {n for n, layer in lut_layers(model) if group_of(n) in ("mlp", "attn") and layer.kind == "linear"}
        hessians = hessians_for(model, names, calib, tokenizer, num_sequences=calib_sequences, seq_len=calib_len)
    act_power = resolve_act_power(model, act_power)
    report = convert_q4_to_q2(model, mlp, attn, tighten_rounds=tighten_rounds, hessians=hessians, act_power=act_power)
    recon = None
    if reference is not None:
        recon = (
            blockwise
            if isinstance(blockwise, ReconstructConfig)
            else ReconstructConfig.from_dict(blockwise or {}, source="convert blockwise")
        )
        ref_model, ref_tok = load_model(reference, device=dev)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise LutqError(f"convert: the reference {reference} has another tokenizer than {src}")
        blocks = calibration_blocks(calib, tokenizer, num_sequences=calib_sequences, seq_len=calib_len)
        report = reconstruct_(model, ref_model, blocks, recon)
        report.title = "convert q4 → q2, block-wise calibration against the FP reference; error vs. the FP weight"
    if show:
        console.print(report.table(per_layer=False))
    converted: dict[str, Any] = {"from": str(src), "kind": "q4-to-q2", "summary": report.to_dict()["summary"]}
    if calib is not None:
        converted["calibration"] = {"source": calib, "sequences": calib_sequences, "seq_len": calib_len}
        if hessians is not None:
            converted["calibration"]["act_power"] = act_power
        if recon is not None:
            converted["calibration"].update(reference=reference, recon=recon.to_dict(), blocks=report.blocks)
    extra = {**info.extra, "converted": json.loads(json.dumps(converted))}
    save_checkpoint(dst, model, tokenizer, extra=extra)
    return report
