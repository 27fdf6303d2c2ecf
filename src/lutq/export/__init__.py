"""Exporters: `ane` (FP16-snapped factored tensors + config.json, docs/formats.md), `hf` (dense
transformers directory with W_eff baked in) and `coreml` (palettized .mlpackage; needs coremltools)."""

from lutq.core.lazy import lazy_exports

_EXPORTS = {
    "AneArtefact": "lutq.export.ane",
    "build_ane_artefact": "lutq.export.ane",
    "load_ane_artefact": "lutq.export.ane",
    "read_ane_artefact": "lutq.export.ane",
    "write_ane_artefact": "lutq.export.ane",
    "FORMATS": "lutq.export.api",
    "ExportConfig": "lutq.export.api",
    "ExportResult": "lutq.export.api",
    "export": "lutq.export.api",
    "print_result": "lutq.export.api",
    "export_hf": "lutq.export.hf",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
