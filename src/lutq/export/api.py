"""`export(ckpt, out, format)`: one entry point for the ane / hf / coreml exporters, with checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lutq.core.atomic import check_replaceable
from lutq.core.configs import ConfigBase
from lutq.core.console import console
from lutq.core.errors import LutqError

FORMATS = ("ane", "hf", "coreml")


@dataclass
class ExportConfig(ConfigBase):
    """Exporter options. keep_dtype (ane): non-LUT tensors keep their stored dtype instead of FP16;
    seq_len / deployment_target (coreml); hf_dtype (hf): fp32 | fp16 | bf16, default as loaded;
    verify: reload what was written and compare (logits, or W_eff for Core ML)."""

    format: str = "ane"
    keep_dtype: bool = False
    seq_len: int = 128
    deployment_target: str = "iOS18"
    hf_dtype: str | None = None
    verify: bool = True

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise LutqError(f"export format {self.format!r}: choose one of {', '.join(FORMATS)}")


@dataclass
class ExportResult:
    """Where the export went, the size report of what was exported, and the verification numbers."""

    path: Path
    format: str
    size: dict[str, Any] | None = None
    checks: dict[str, float] = field(default_factory=dict)
    snap: str | None = None


def _probe(model: nn.Module, seq_len: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)


def snapped_lut_model(model: nn.Module, where: str = "the model") -> str | None:
    """Snap a LUT model to FP16 in place unless it already is; returns the snap summary (None if it was). Errors
    (a latent layer: no fixed indices) name `where`."""
    from lutq.quant import lut_layers, snap_model
    from lutq.quant.storage import is_snapped

    if not any(True for _ in lut_layers(model)):
        raise LutqError(f"{where}: this export needs a LUT (quantized) model; got a dense model — use --format hf")
    if is_snapped(model):
        return None
    try:
        return snap_model(model).summary()  # refuses latent layers before it snaps any
    except LutqError as e:
        raise LutqError(f"{where}: {e}") from e


EXPORT_MARKERS = ("lutq_export.json", "coreml.json")  # hf / coreml; ane: config.json with format lutq-ane


def _is_lutq_export(path: Path) -> bool:
    from lutq.export.ane import FORMAT
    from lutq.models.load import lutq_format

    if any((path / m).is_file() for m in EXPORT_MARKERS):
        return True
    try:
        return (path / "config.json").is_file() and lutq_format(path / "config.json") == FORMAT
    except LutqError:  # an unreadable config.json: not an export
        return False


def check_out(out: Path, ckpt: str | Path | nn.Module) -> None:
    """OUT may be new, an empty directory or a previous lutq export (replaced atomically on success); never the
    checkpoint being exported or a directory holding it, a file, or a directory of anything else."""
    check_replaceable(
        out,
        what=f"a previous lutq export (no lutq-ane config.json, {' or '.join(EXPORT_MARKERS)})",
        is_ours=_is_lutq_export,
        inputs=[] if isinstance(ckpt, nn.Module) else [ckpt],
        input_what="checkpoint being exported",
    )


@torch.no_grad()
def export(
    ckpt: str | Path | nn.Module,
    out: str | Path,
    format: str = "ane",
    cfg: ExportConfig | None = None,
    *,
    tokenizer: Any = None,
) -> ExportResult:
    """Export a lutq checkpoint (or any model `lutq.models.load_model` resolves, or a loaded model with
    `tokenizer`) as `format` into `out`. The in-memory model is snapped / dequantized in place."""
    from lutq.evaluate.size import model_size
    from lutq.models import load_model

    cfg = (cfg or ExportConfig()).replace(format=format)
    cfg.validate()
    check_out(Path(out), ckpt)
    source = str(ckpt) if not isinstance(ckpt, nn.Module) else type(ckpt).__name__
    model, tok = (ckpt, tokenizer) if isinstance(ckpt, nn.Module) else load_model(ckpt)
    model.eval()
    if cfg.format == "hf":
        return _export_hf(model, tok, Path(out), cfg, source, model_size(model))
    snap = snapped_lut_model(model, source)
    from lutq.export.ane import build_ane_artefact, model_from_artefact, write_ane_artefact

    art = build_ane_artefact(model, keep_dtype=cfg.keep_dtype, source=source)
    result = ExportResult(Path(out), cfg.format, _exported_size(model_size(model), art.config["size"]), snap=snap)
    if cfg.format == "ane":
        write_ane_artefact(art, out, tok)
        if cfg.verify:
            from lutq.export.ane import load_ane_artefact

            reloaded, _ = load_ane_artefact(out)
            result.checks["max_abs_logit_diff"] = _logit_diff(model, reloaded)
        return result
    from lutq.export.coreml import CoreMLConfig, export_coreml, run_graph_torch, verify_package

    export_coreml(art, model, out, CoreMLConfig(seq_len=cfg.seq_len, deployment_target=cfg.deployment_target), tok)
    if cfg.verify:
        from lutq.export.coreml import PACKAGE

        result.checks["max_abs_weff_diff"] = verify_package(art, Path(out) / PACKAGE)
        probe = _probe(model, cfg.seq_len)
        graph = run_graph_torch(art, model, probe)  # the program's graph, executed with torch in float32
        reference = model_from_artefact(art)(probe).logits
        result.checks["graph_max_abs_logit_diff"] = float((graph - reference).abs().max())
    return result


def _exported_size(size: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """`model_size(model)` with the artefact's own size report (dense tensors at their exported dtype); the
    whole-model numbers recomputed the way `lutq.evaluate.size.model_size` does."""
    q = report["quantized"]
    params = q["weights"] + report["other_params"]
    bits = q["bits"] + 8 * report["other_bytes"]
    total = {
        "params": params,
        "size_mb": report["total_bytes"] / 1e6,
        "bits_per_weight": bits / params if params else 0.0,
    }
    return {**size, "total": total, "report": report}


def _logit_diff(a: nn.Module, b: nn.Module) -> float:
    probe = _probe(a)
    return float((a(probe).logits.float() - b(probe).logits.float()).abs().max())


def _export_hf(
    model: nn.Module, tok: Any, out: Path, cfg: ExportConfig, source: str, size: dict[str, Any]
) -> ExportResult:
    from lutq.export.hf import export_hf
    from lutq.models.load import parse_dtype

    probe = _probe(model)
    before = model(probe).logits.float() if cfg.verify else None
    export_hf(model, tok, out, dtype=parse_dtype(cfg.hf_dtype), source=source)
    result = ExportResult(out, "hf", size)
    if before is not None:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        result.checks["max_abs_logit_diff"] = float((reloaded(probe).logits.float() - before).abs().max())
    return result


def print_result(result: ExportResult) -> None:
    """What `lutq export` prints: snap summary, size table, checks, output path."""
    from lutq.evaluate.size import size_table

    if result.snap:
        console.print(result.snap)
    if result.size is not None:
        what = "export source" if result.format == "hf" else "export"
        console.print(size_table(result.size, title=f"size ({result.format} {what})"))
    for k, v in result.checks.items():
        console.print(f"check {k}: {v:.3g}")
    console.print(f"[green]wrote[/] {result.path}")
