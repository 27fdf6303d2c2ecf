"""lutq: lookup-table (palettized) 2-/4-bit QAT with knowledge distillation, ANE export, and pretraining."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "quantize"]


def quantize(model: Any, config: Any = "q2a4", **kwargs: Any) -> Any:
    """Replace the matching linears of `model` with LUT layers in place; see `lutq.quant.quantize`."""
    from lutq.quant import quantize as _quantize

    return _quantize(model, config, **kwargs)


def load_model(spec: str, **kwargs: Any) -> Any:
    """Load (model, tokenizer) from an asset name, a directory, a GGUF file or a hub id."""
    from lutq.models import load_model as _load_model

    return _load_model(spec, **kwargs)
