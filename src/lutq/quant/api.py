"""Model-level API: `quantize(model, "q2a4")` (in place, like torchao's quantize_), trainable sets,
LUT projection, and `dequantize_` (LUT layers -> dense nn.Linear with W_eff, for HF export)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lutq.core.console import progress as progress_bar
from lutq.core.errors import LutqError
from lutq.quant.calibrate import calibrate_layer_, column_weights
from lutq.quant.init import init_from_weight_, relative_error
from lutq.quant.layer import LUTEmbedding, LUTLinear
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES, CalibSource, LayerSpec, QuantConfig, group_of, resolve_config

TRAINABLE_MODES = ("all", "mlp-only", "attn-only", "g-only", "freeze-g", "lut", "none")
FLAG_ERROR = 1.0  # a layer error above this (W_eff farther from W than zero is) or not finite is flagged


@dataclasses.dataclass
class QuantRow:
    """One quantized layer: where, what, and how far W_eff is from the reference weight."""

    name: str
    group: str
    shape: tuple[int, int]
    lut_size: int
    rank: int
    lut_kind: str
    rel_error: float | None
    out_error: float | None = None  # calibrated: sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) on the calibration inputs


@dataclasses.dataclass
class QuantReport:
    """Per-layer rows of a quantize / convert; `.table()` prints, `.to_dict()` serializes."""

    rows: list[QuantRow] = dataclasses.field(default_factory=list)
    title: str = "quantization"
    blocks: list[dict[str, float]] = dataclasses.field(default_factory=list)  # block-wise calibration losses

    def mean_error(self, group: str | None = None) -> float | None:
        errs = [r.rel_error for r in self.rows if r.rel_error is not None and group in (None, r.group)]
        return sum(errs) / len(errs) if errs else None

    def max_error(self, group: str | None = None) -> float | None:
        errs = [r.rel_error for r in self.rows if r.rel_error is not None and group in (None, r.group)]
        return max(errs) if errs else None

    def mean_out_error(self, group: str | None = None) -> float | None:
        errs = [r.out_error for r in self.rows if r.out_error is not None and group in (None, r.group)]
        return sum(errs) / len(errs) if errs else None

    def flagged(self) -> list[str]:
        """Layers whose relative error is not finite or above FLAG_ERROR: a wrong init, not a coarse LUT."""
        return [r.name for r in self.rows if r.rel_error is not None and not r.rel_error <= FLAG_ERROR]

    def to_dict(self) -> dict[str, Any]:
        groups = sorted({r.group for r in self.rows})
        summary: dict[str, dict[str, Any]] = {}
        for g in groups:
            summary[g] = {
                "layers": sum(r.group == g for r in self.rows),
                "mean_rel_error": self.mean_error(g),
                "max_rel_error": self.max_error(g),
            }
            if self.mean_out_error(g) is not None:
                summary[g]["mean_out_error"] = self.mean_out_error(g)
        out = {"title": self.title, "layers": [dataclasses.asdict(r) for r in self.rows], "summary": summary}
        if self.blocks:
            out["blocks"] = self.blocks
        if self.flagged():
            out["flagged"] = self.flagged()
        return out

    def table(self, *, per_layer: bool = True) -> Any:
        """A rich Table: one row per layer (or per group with per_layer=False) with relative errors."""
        from rich.table import Table

        flagged = set(self.flagged())
        caption = (
            f"[bold red]{len(flagged)} layers flagged (!)[/]: ‖W_eff−W‖/‖W‖ not finite or > {FLAG_ERROR}, a wrong init"
            if flagged
            else None
        )
        t = Table(title=self.title, caption=caption)
        calibrated = any(r.out_error is not None for r in self.rows)
        cols = ["layer", "group", "shape", "lut", "rank", "‖W_eff−W‖/‖W‖"] + (["output error"] if calibrated else [])
        for col in cols:
            t.add_column(col, justify="left" if col in ("layer", "group") else "right")
        if per_layer:
            for r in self.rows:
                err = "-" if r.rel_error is None else f"{r.rel_error:.4f}" + (" !" if r.name in flagged else "")
                out = ["-" if r.out_error is None else f"{r.out_error:.4f}"] if calibrated else []
                t.add_row(
                    r.name, r.group, f"{r.shape[0]}×{r.shape[1]}", f"{r.lut_size} {r.lut_kind}", str(r.rank), err, *out
                )
        for g, s in self.to_dict()["summary"].items():
            mean = "-" if s["mean_rel_error"] is None else f"{s['mean_rel_error']:.4f} (max {s['max_rel_error']:.4f})"
            out = [f"[bold]{s['mean_out_error']:.4f}" if "mean_out_error" in s else "-"] if calibrated else []
            t.add_row(f"[bold]{g}: {s['layers']} layers", g, "", "", "", f"[bold]{mean}", *out)
        return t


# ----------------------------------------------------------------------------------------- helpers
def lut_layers(model: nn.Module) -> Iterator[tuple[str, LUTLinear]]:
    """(name, layer) for every LUT layer of the model."""
    for name, m in model.named_modules():
        if isinstance(m, LUTLinear):
            yield name, m


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _untie_if_needed(model: nn.Module, cfg: QuantConfig) -> None:
    """Quantizing lm_head or the embeddings of a tied model unties them (each gets its own copy)."""
    if not (cfg.quantize_lm_head or cfg.quantize_embeddings):
        return
    config = getattr(model, "config", None)
    head, emb = getattr(model, "lm_head", None), model.get_input_embeddings() if config is not None else None
    if head is None or emb is None or head.weight is not emb.weight:
        return
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    config.tie_word_embeddings = False
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        text_config.tie_word_embeddings = False


def _make_layer(module: nn.Module, spec: LayerSpec, cfg: QuantConfig) -> LUTLinear:
    w = module.weight
    kw: dict[str, Any] = {"mode": cfg.mode, "ste_fp16": cfg.ste_fp16, "device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.Embedding):
        scale = getattr(module, "embed_scale", 1.0)
        return LUTEmbedding(
            module.num_embeddings,
            module.embedding_dim,
            spec.lut_size,
            spec.rank,
            padding_idx=module.padding_idx,
            embed_scale=float(scale),
            **kw,
        )
    return LUTLinear(
        module.in_features, module.out_features, spec.lut_size, spec.rank, bias=module.bias is not None, **kw
    )


# ------------------------------------------------------------------------------------------ quantize
def quantize(
    model: nn.Module,
    config: str | QuantConfig | dict[str, Any] = "q2a4",
    *,
    init: bool = True,
    hessians: Mapping[str, torch.Tensor] | None = None,
    skip_init: Collection[str] = (),
    progress: bool = True,
) -> QuantReport:
    """Replace the matching linears of `model` by LUT layers in place; returns the per-layer error report.

    `config` is a preset name (q2a4, q4a4, q4a4_r32, q2a2), a QuantConfig or a dict of its fields.
    `hessians` (from `lutq.quant.calibrate.collect_hessians` on the FP model) turns on GPTQ index picking
    for every layer that has one. With init=False the layers are only created (shapes right, values
    placeholder): for loading a state. Layers named in `skip_init` are created but not initialized, for a
    caller that initializes them itself (the block-wise re-init). Biases are always copied from the linears.
    """
    cfg = resolve_config(config)
    if any(True for _ in lut_layers(model)):
        raise LutqError("quantize: the model already has LUT layers (load it unquantized, or convert it)")
    if hessians is not None and cfg.mode == "latent":
        raise LutqError(
            "quantize: calibration picks fixed indices and a latent layer re-picks them every step; "
            "quantize frozen with the Hessians, then train with --latent (it starts from W_eff)"
        )
    _untie_if_needed(model, cfg)
    targets = []
    for name, module in model.named_modules():
        picked = cfg.spec_for(name) if isinstance(module, nn.Linear | nn.Embedding) else None
        if picked is not None:
            targets.append((name, module, *picked))
    if not targets:
        raise LutqError(
            f"quantize: no layers of {type(model).__name__} match the config "
            "(expected HF names like model.layers.0.mlp.gate_proj)"
        )
    report = QuantReport(title=f"quantize {cfg.preset or 'custom'}")
    with progress_bar(transient=True) as bar:
        task = bar.add_task("quantizing", total=len(targets), visible=progress)
        for name, module, group, spec in targets:
            if init and name not in skip_init:
                _check_finite(name, module.weight)
            layer = _make_layer(module, spec, cfg)
            err = out_err = None
            if init and name not in skip_init:
                h = hessians.get(name) if hessians is not None else None
                cw = column_weights(h, cfg.init_act_power) if h is not None and cfg.init_act_power else None
                err = init_from_weight_(
                    layer,
                    module.weight,
                    group_size=cfg.group_size,
                    lut_kind=spec.lut_kind,
                    tighten_rounds=cfg.tighten_rounds,
                    col_weight=cw,
                )
                if hessians is not None and name in hessians:
                    out_err = calibrate_layer_(
                        layer, module.weight, hessians[name], damp=cfg.gptq_damp, refit_rounds=cfg.gptq_refit_rounds
                    )
                    err = relative_error(layer, module.weight)
            if layer.bias is not None:
                layer.bias.data.copy_(module.bias.detach())
            replace_module(model, name, layer)
            report.rows.append(
                QuantRow(
                    name,
                    group,
                    (layer.out_features, layer.in_features),
                    spec.lut_size,
                    spec.rank,
                    spec.lut_kind,
                    err,
                    out_err,
                )
            )
            bar.advance(task)
    model.lutq_config = cfg
    return report


def _check_finite(name: str, weight: torch.Tensor) -> None:
    bad = int((~torch.isfinite(weight.detach())).sum())
    if bad:
        raise LutqError(
            f"quantize: {name}: the weight has {bad} non-finite value(s) (NaN/inf) of {weight.numel()}; "
            "the source model is broken (nothing was written)"
        )


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig a model was quantized with (None if unknown)."""
    cfg = getattr(model, "lutq_config", None)
    return cfg if isinstance(cfg, QuantConfig) else None


# ------------------------------------------------------------------------------------- trainables
def set_trainable(model: nn.Module, mode: str = "all", *, lut: bool = False) -> list[str]:
    """Freeze everything (embeddings, norms, lm_head included) except the selected LUT-layer parts.

    Modes: all (A, B, g of every LUT layer; `weight` for latent layers), mlp-only, attn-only, g-only,
    freeze-g (A and B; g frozen), lut (the LUT entries only), none. `lut=True` adds the LUT entries to
    any mode. Returns the names of the trainable parameters.
    """
    if mode not in TRAINABLE_MODES:
        raise LutqError(f"set_trainable: unknown mode {mode!r}; valid: {list(TRAINABLE_MODES)}")
    layers = list(lut_layers(model))
    if not layers:
        raise LutqError("set_trainable: the model has no LUT layers (run lutq.quantize first)")
    for p in model.parameters():
        p.requires_grad_(False)
    parts = {
        "all": {"A", "B", "g"},
        "mlp-only": {"A", "B", "g"},
        "attn-only": {"A", "B", "g"},
        "g-only": {"g"},
        "freeze-g": {"A", "B"},
        "lut": {"lut"},
        "none": set(),
    }[mode]
    for name, layer in layers:
        selected = mode not in ("mlp-only", "attn-only") or group_of(name) == mode.removesuffix("-only")
        layer_parts = (parts if selected else set()) | ({"lut"} if lut else set())
        layer.set_trainable(layer_parts)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def project_luts_(model: nn.Module) -> int:
    """After an optimizer step: restore sorted FP16-exact LUTs in every layer whose LUT trains; returns count."""
    n = 0
    for _, layer in lut_layers(model):
        if isinstance(layer.lut, nn.Parameter):
            layer.project_()
            n += 1
    return n


# ------------------------------------------------------------------------------------- dequantize
class ScaledEmbedding(nn.Embedding):
    """nn.Embedding whose output is multiplied by `embed_scale` (Gemma 3's scaled embeddings)."""

    def __init__(self, *args: Any, embed_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


@torch.no_grad()
def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every LUT layer by a dense nn.Linear / nn.Embedding holding W_eff (same dtype); in place."""
    for name, layer in list(lut_layers(model)):
        w = layer.effective_weight().detach()
        dtype = layer.scale_A.dtype
        if isinstance(layer, LUTEmbedding):
            dense: nn.Module = ScaledEmbedding(
                layer.out_features,
                layer.in_features,
                layer.padding_idx,
                embed_scale=layer.embed_scale,
                device=w.device,
                dtype=dtype,
            )
            dense.weight.copy_(w)
        else:
            dense = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dtype
            )
            dense.weight.copy_(w)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        replace_module(model, name, dense)
    if hasattr(model, "lutq_config"):
        del model.lutq_config
    return model


def quantize_checkpoint(
    model_spec: str,
    out: str | Path,
    config: Any,
    *,
    calib: CalibSource | None = None,
    calib_sequences: int = CALIB_SEQUENCES,
    calib_len: int = CALIB_LEN,
    blockwise: Any = None,
    device: str = "cpu",
    extra: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> QuantReport:
    """Load `model_spec` (asset, HF dir, .gguf, hub id), quantize it with `config` (a preset name, a QuantConfig
    or a dict) and save the checkpoint `out`; returns the report. With `calib` (a KD cache or a data source):
    GPTQ indices from Hessians of the FP model (one-shot) or, with `blockwise` (a ReconstructConfig or its
    fields as a dict), block-wise calibration (`lutq.quant.reconstruct.quantize_blockwise`). The work runs on
    `device` ("auto": CUDA when present); the checkpoint is written from the CPU either way."""
    from lutq.core.device import resolve_device
    from lutq.models import load_model, save_checkpoint
    from lutq.models.checkpoint import check_checkpoint_out
    from lutq.quant.calibrate import calibration_blocks, hessians_for
    from lutq.quant.reconstruct import ReconstructConfig, quantize_blockwise

    if blockwise is not None and calib is None:
        raise LutqError("quantize: block-wise calibration needs calibration data (calib)")
    check_checkpoint_out(out, model_spec)
    if blockwise is not None and not isinstance(blockwise, ReconstructConfig):
        blockwise = ReconstructConfig.from_dict(dict(blockwise), source="quantize blockwise")
    dev = resolve_device(device)
    model, tok = load_model(model_spec, device=dev)
    if blockwise is not None:
        blocks = calibration_blocks(calib, tok, num_sequences=calib_sequences, seq_len=calib_len)
        report = quantize_blockwise(model, config, blocks, blockwise, show_progress=show_progress)
    else:
        hessians = (
            None
            if calib is None
            else hessians_for(
                model, config, calib, tok, num_sequences=calib_sequences, seq_len=calib_len, show_progress=show_progress
            )
        )
        report = quantize(model, config, hessians=hessians, progress=show_progress)
    if report.flagged():
        from lutq.core.console import console

        console.print(
            f"[bold red]warning:[/] {len(report.flagged())} layer(s) with a relative error not finite or "
            f"> {FLAG_ERROR} (a wrong init): {', '.join(report.flagged()[:4])}"
        )
    meta: dict[str, Any] = {
        "source_model": str(model_spec),
        "quantize": report.to_dict()["summary"],
        "device": dev.type,
    }
    if calib is not None:
        meta["calibration"] = {
            "source": calib,
            "sequences": calib_sequences,
            "seq_len": calib_len,
            "method": "one-shot" if blockwise is None else "blockwise",
        }
        if blockwise is not None:
            meta["calibration"].update(recon=blockwise.to_dict(), blocks=report.blocks)
    save_checkpoint(out, model, tok, extra={**meta, **(extra or {})})
    return report
