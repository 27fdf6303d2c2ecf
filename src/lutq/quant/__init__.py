"""LUT quantization: the LUT linear layer, init, presets, quantize(), conversions, FP16 snap, storage.

    import lutq
    model, tok = lutq.load_model("smollm2-135m-instruct")
    report = lutq.quantize(model, "q2a4")          # in place; report.table() for the per-layer errors
    lutq.quant.set_trainable(model, "mlp-only")    # -> names of the trainable parameters
"""

from lutq.quant.api import (
    QuantReport,
    QuantRow,
    dequantize_,
    lut_layers,
    project_luts_,
    quant_config_of,
    quantize,
    set_trainable,
)
from lutq.quant.convert import convert_q4_to_q2, freeze_latent, unfreeze_latent
from lutq.quant.layer import LUTEmbedding, LUTLinear
from lutq.quant.presets import PRESETS, LayerSpec, QuantConfig, get_preset
from lutq.quant.snap import SnapReport, snap_model

__all__ = [
    "PRESETS",
    "LUTEmbedding",
    "LUTLinear",
    "LayerSpec",
    "QuantConfig",
    "QuantReport",
    "QuantRow",
    "SnapReport",
    "convert_q4_to_q2",
    "dequantize_",
    "freeze_latent",
    "get_preset",
    "lut_layers",
    "project_luts_",
    "quant_config_of",
    "quantize",
    "set_trainable",
    "snap_model",
    "unfreeze_latent",
]
