"""LUT quantization: the LUT linear layer, init, presets, quantize(), conversions, FP16 snap, storage.

import lutq
model, tok = lutq.load_model("smollm2-135m-instruct")
report = lutq.quantize(model, "q2a4")          # in place; report.table() for the per-layer errors
lutq.quant.set_trainable(model, "mlp-only")    # -> names of the trainable parameters
"""

from lutq.core.lazy import lazy_exports

_EXPORTS = {
    "QuantReport": "lutq.quant.api",
    "QuantRow": "lutq.quant.api",
    "dequantize_": "lutq.quant.api",
    "lut_layers": "lutq.quant.api",
    "project_luts_": "lutq.quant.api",
    "quant_config_of": "lutq.quant.api",
    "quantize": "lutq.quant.api",
    "set_trainable": "lutq.quant.api",
    "convert_q4_to_q2": "lutq.quant.convert",
    "freeze_latent": "lutq.quant.convert",
    "unfreeze_latent": "lutq.quant.convert",
    "LUTEmbedding": "lutq.quant.layer",
    "LUTLinear": "lutq.quant.layer",
    "PRESETS": "lutq.quant.presets",
    "LayerSpec": "lutq.quant.presets",
    "QuantConfig": "lutq.quant.presets",
    "get_preset": "lutq.quant.presets",
    "SnapReport": "lutq.quant.snap",
    "snap_model": "lutq.quant.snap",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
