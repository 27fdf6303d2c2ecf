"""The built-in stage kinds: thin adapters from a recipe's params to each stage's library function.

Where a stage already has a config dataclass (CacheConfig, TrainConfig, ExportConfig) the recipe's params
*are* that config (same keys, same validation); the runner only fills in the output directory.

| kind      | library call                                   | output (`@name`)          |
|-----------|------------------------------------------------|---------------------------|
| assets    | lutq.assets.fetch                              | out/assets.json           |
| cache     | lutq.kd.build_cache(CacheConfig)               | the cache directory       |
| quantize  | lutq.quant.quantize + save_checkpoint          | a checkpoint (naive PTQ)  |
| train     | lutq.train.recipes.run_stage(TrainConfig)      | the run's best/ (or last/)|
| convert   | lutq.quant.convert.convert_checkpoint (q4→q2)  | a checkpoint              |
| snap      | lutq.quant.snap_model + save_checkpoint        | a checkpoint              |
| export    | lutq.export.export(ExportConfig)               | the exported artefact     |
| eval      | lutq.evaluate.compare                          | compare.md / compare.json |
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lutq.core.atomic import atomic_write_json, atomic_write_text
from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.kd import CacheConfig
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES
from lutq.speedrun.runner import StageContext, StageKind, register_kind
from lutq.train import TrainConfig


def _checkpoint_ok(path: Path) -> None:
    from lutq.models import read_checkpoint_info
    from lutq.models.checkpoint import WEIGHTS

    info = read_checkpoint_info(path)  # raises LutqError naming what is wrong
    weights = path / WEIGHTS  # config.json alone is not a checkpoint that loads: its weights must be there, whole
    if not weights.is_file():
        raise LutqError(f"{weights}: missing (incomplete checkpoint)")
    if info.weights_bytes is not None and weights.stat().st_size != info.weights_bytes:
        raise LutqError(
            f"{weights}: {weights.stat().st_size} bytes, config.json says {info.weights_bytes} (truncated or replaced)"
        )


# ----------------------------------------------------------------------------------------------- assets
@dataclass
class AssetsParams(ConfigBase):
    """Offline assets to fetch (idempotent: already fetched ones are only checked)."""

    names: tuple[str, ...] = ("smollm2-135m-instruct", "sharegpt", "shakespeare", "python-docs")


def _run_assets(ctx: StageContext, p: AssetsParams) -> dict[str, Any]:
    from lutq.assets import fetch

    paths = {name: str(fetch(name)) for name in p.names}
    atomic_write_json(ctx.out / "assets.json", paths)
    return {"assets": sorted(paths)}


def _check_assets(ctx: StageContext, p: AssetsParams) -> None:
    from lutq.assets import is_fetched

    missing = [n for n in p.names if not is_fetched(n)]
    if missing:
        raise LutqError(f"assets not fetched: {missing}")


# ------------------------------------------------------------------------------------------------ cache
def _run_cache(ctx: StageContext, cfg: Any) -> dict[str, Any]:
    from lutq.kd import build_cache

    out = build_cache(cfg.replace(out=ctx.out))  # resumes a partly written cache by itself
    meta = json.loads((out / "meta.json").read_text())
    build = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    return {
        "sequences": meta.get("sequences"),
        "tokens": meta.get("tokens"),
        "bytes_per_token": meta.get("bytes_per_token"),
        "build": build,
    }


def _check_cache(ctx: StageContext, cfg: Any) -> None:
    from lutq.kd import KDCache

    if not KDCache(ctx.out).has_teacher_lse:  # a stage may train on it with the full-vocabulary KL
        raise LutqError(f"KD cache {ctx.out} was built before lutq stored the teacher's log-sum-exp")


# --------------------------------------------------------------------------------------------- quantize
@dataclass
class QuantizeParams(ConfigBase):
    """Quantize a FP model with a preset (plus QuantConfig overrides) and save it: the naive-PTQ baseline."""

    model: str = "smollm2-135m-instruct"
    preset: str = "q4a4"
    config: dict[str, Any] = field(default_factory=dict)  # QuantConfig fields overriding the preset
    lut_kind: str | None = None  # "uniform" | "kmeans" for every layer; None: the preset's
    calib: str | list[str] | None = None  # GPTQ on a KD cache ("@cache"), a data source or an even mix; None: nearest
    calib_sequences: int = CALIB_SEQUENCES
    calib_len: int = CALIB_LEN
    # with calib: block-wise calibration (lutq.quant.reconstruct.ReconstructConfig fields, e.g. {steps = 100});
    # None: one-shot GPTQ with Hessians of the FP model
    blockwise: dict[str, Any] | None = None
    device: str = "cpu"  # where PTQ runs: cpu, cuda or auto (the CUDA path is not yet measured on a GPU)

    def validate(self) -> None:
        if self.blockwise is not None:
            if self.calib is None:
                raise LutqError("quantize stage: `blockwise` needs `calib`")
            self.recon_config().validate()

    def recon_config(self) -> Any:
        from lutq.quant.reconstruct import ReconstructConfig

        return ReconstructConfig.from_dict(self.blockwise or {}, source="quantize stage blockwise")


def stage_quant_config(p: QuantizeParams) -> Any:
    """The QuantConfig a quantize stage uses: the preset, `config`'s fields over it (a partial table such as
    {mlp = {rank = 8}} over the preset's table, not over LayerSpec's defaults), then `lut_kind`."""
    from lutq.quant import get_preset
    from lutq.quant.presets import resolve_config

    config = get_preset(p.preset).to_dict()
    for key, value in p.config.items():
        both = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if both else value
    cfg = resolve_config(config)
    return cfg.with_lut_kind(p.lut_kind) if p.lut_kind is not None else cfg


def _run_quantize(ctx: StageContext, p: QuantizeParams) -> dict[str, Any]:
    from lutq.quant.api import quantize_checkpoint

    config = stage_quant_config(p)
    report = quantize_checkpoint(
        p.model,
        ctx.out,
        config,
        calib=p.calib,
        calib_sequences=p.calib_sequences,
        calib_len=p.calib_len,
        blockwise=None if p.blockwise is None else p.recon_config(),
        device=p.device,
        extra={"speedrun_stage": ctx.name},
    )
    out: dict[str, Any] = {"rel_error": report.to_dict()["summary"]}
    if report.blocks:
        out["block_losses"] = [[b["loss_before"], b["loss_after"]] for b in report.blocks]
    return out


# ------------------------------------------------------------------------------------------------ train
def _run_train(ctx: StageContext, cfg: Any) -> dict[str, Any]:
    from lutq.train.recipes import run_stage

    # run_stage resumes the run in ctx.out when it has a checkpoint to resume from, else starts it; the
    # runner has already cleared ctx.out if the params changed, so what is there is this stage's own run
    result = run_stage(cfg.replace(out=ctx.out))
    summary = json.loads(json.dumps(dataclasses.asdict(result), default=str))
    return {**summary, "output": str(result.checkpoint)}


def _check_train(ctx: StageContext, cfg: Any) -> None:
    best, last = ctx.out / "best", ctx.out / "last"
    _checkpoint_ok(best if (best / "config.json").is_file() else last)


# ----------------------------------------------------------------------------------- convert / snap
@dataclass
class ConvertParams(ConfigBase):
    """Q4 → Q2 (q2a4) conversion of a checkpoint (lutq.train.recipes.convert_checkpoint)."""

    input: Path = Path("model")
    tighten_rounds: int = 0
    calib: str | list[str] | None = None  # GPTQ on a KD cache ("@cache"), a data source or an even mix (a list)
    calib_sequences: int = CALIB_SEQUENCES
    calib_len: int = CALIB_LEN
    reference: str | None = None  # with calib: the FP model to calibrate against block by block
    blockwise: dict[str, Any] | None = None  # ReconstructConfig fields for the block-wise calibration
    device: str = "cpu"  # where the conversion runs: cpu, cuda or auto (CUDA not yet measured on a GPU)

    def validate(self) -> None:
        if self.reference is not None and self.calib is None:
            raise LutqError("convert stage: `reference` needs `calib`")
        if self.blockwise is not None and self.reference is None:
            raise LutqError("convert stage: `blockwise` needs `reference` (the FP model to calibrate against)")


def _run_convert(ctx: StageContext, p: ConvertParams) -> dict[str, Any]:
    from lutq.models import read_checkpoint_info
    from lutq.train.recipes import convert_checkpoint

    convert_checkpoint(
        p.input,
        ctx.out,
        tighten_rounds=p.tighten_rounds,
        calib=p.calib,
        calib_sequences=p.calib_sequences,
        calib_len=p.calib_len,
        reference=p.reference,
        blockwise=p.blockwise,
        device=p.device,
    )
    converted = read_checkpoint_info(ctx.out).extra.get("converted", {})
    return {"rel_error": converted.get("summary", {})}


@dataclass
class SnapParams(ConfigBase):
    """Snap a checkpoint to FP16 (LUT, Â·g, B̂) and verify on a probe batch."""

    input: Path = Path("model")


def _run_snap(ctx: StageContext, p: SnapParams) -> dict[str, Any]:
    from lutq.models import load_checkpoint, save_checkpoint
    from lutq.quant import freeze_latent, snap_model

    model, tok, _ = load_checkpoint(p.input)
    freeze_latent(model)  # a latent-trained model: fix idx = nearest(weight / S), what its forward used
    report = snap_model(model)
    save_checkpoint(ctx.out, model, tok, extra={"speedrun_stage": ctx.name, "source": str(p.input)})
    return {
        "max_abs_logit_error": report.max_abs_error,
        "rel_logit_error": report.rel_error,
        "summary": report.summary(),
    }


def _check_ckpt(ctx: StageContext, p: Any) -> None:
    _checkpoint_ok(ctx.out)


# ----------------------------------------------------------------------------------------------- export
@dataclass
class ExportParams(ConfigBase):
    """Export a checkpoint; `options` are lutq.export.ExportConfig fields (keep_dtype, hf_dtype, verify, ...)."""

    input: Path = Path("model")
    format: str = "ane"
    options: dict[str, Any] = field(default_factory=dict)

    def export_config(self) -> Any:
        from lutq.export.api import ExportConfig

        cfg = ExportConfig.from_dict({**self.options, "format": self.format}, source="export options")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.export_config()


def _run_export(ctx: StageContext, p: ExportParams) -> dict[str, Any]:
    from lutq.export.api import export

    res = export(p.input, ctx.out, p.format, p.export_config())
    total = (res.size or {}).get("total", {})
    return {"format": res.format, "checks": res.checks, "snap": res.snap, "size_total": total}


def _check_export(ctx: StageContext, p: ExportParams) -> None:
    if not ctx.out.is_dir() or not any(ctx.out.iterdir()):
        raise LutqError(f"{ctx.out}: export output missing")


# ------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalParams(ConfigBase):
    """Compare models on the same data: held-out perplexity per text, KD metrics on the cache's val split,
    size and bits/weight. `models` maps a row label to a model spec (asset, checkpoint, "@stage")."""

    models: dict[str, str] = field(default_factory=dict)
    cache: Path | None = None
    texts: tuple[str, ...] = ("shakespeare:val", "python-docs:val")
    options: dict[str, Any] = field(default_factory=dict)  # lutq.evaluate.CompareConfig fields

    def validate(self) -> None:
        from lutq.evaluate import CompareConfig

        if not self.models:
            raise LutqError("eval stage: `models` is empty (label = model spec)")
        CompareConfig.from_dict(self.options, source="eval stage options")


def _run_eval(ctx: StageContext, p: EvalParams) -> dict[str, Any]:
    import torch

    from lutq.evaluate import compare

    options = {"device": "cuda" if torch.cuda.is_available() else "cpu", **p.options}
    result = compare(dict(p.models), cache=p.cache, texts=tuple(p.texts), **options)
    table = result.markdown()
    ctx.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.out / "compare.md", table)
    atomic_write_json(ctx.out / "compare.json", result.to_dict())
    return {"table": table, "rows": [_figures(r) for r in result.rows()]}


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one compare row (the run log keeps these; compare.json has everything)."""
    total = row["size"]["total"]
    return {
        "model": row["label"],
        "spec": row["model"],
        "size_mb": total.get("size_mb"),
        "bits_per_weight": total.get("bits_per_weight"),
        "ppl": row["ppl"],
        "ppl_ci": row.get("ppl_ci"),
        "ppl_vs_ref": row.get("ppl_vs_ref"),
        "kd_vs_ref": row.get("kd_vs_ref"),
        "kd": row["kd"],
    }


def _check_eval(ctx: StageContext, p: EvalParams) -> None:
    if not (ctx.out / "compare.json").is_file():
        raise LutqError(f"{ctx.out}/compare.json missing")


def _kind(name: str, params: Any, run: Any, check: Any, scaled: tuple[str, ...], description: str) -> None:
    register_kind(StageKind(name, params, run, check, scaled, description))


_kind("assets", AssetsParams, _run_assets, _check_assets, (), "fetch offline assets")
_kind("cache", CacheConfig, _run_cache, _check_cache, ("num_sequences", "max_tokens"), "teacher top-K KD cache")
_kind("quantize", QuantizeParams, _run_quantize, _check_ckpt, (), "quantize a FP model with a preset (PTQ init)")
_kind("train", TrainConfig, _run_train, _check_train, ("steps", "warmup"), "KD-QAT training (resumes)")
_kind("convert", ConvertParams, _run_convert, _check_ckpt, (), "q4 -> q2 conversion")
_kind("snap", SnapParams, _run_snap, _check_ckpt, (), "FP16 snap")
_kind("export", ExportParams, _run_export, _check_export, (), "export ane / hf / coreml")
_kind("eval", EvalParams, _run_eval, _check_eval, (), "comparison table")
