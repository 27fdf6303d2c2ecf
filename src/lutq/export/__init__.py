"""Exporters: `ane` (FP16-snapped factored tensors + config.json, docs/formats.md), `hf` (dense
transformers directory with W_eff baked in) and `coreml` (palettized .mlpackage; needs coremltools)."""

from lutq.export.ane import AneArtefact, build_ane_artefact, load_ane_artefact, read_ane_artefact, write_ane_artefact
from lutq.export.api import FORMATS, ExportConfig, ExportResult, export, print_result
from lutq.export.hf import export_hf

__all__ = [
    "FORMATS",
    "AneArtefact",
    "ExportConfig",
    "ExportResult",
    "build_ane_artefact",
    "export",
    "export_hf",
    "load_ane_artefact",
    "print_result",
    "read_ane_artefact",
    "write_ane_artefact",
]
