"""Dense transformers export: W_eff baked into plain nn.Linear weights, loadable by
`AutoModelForCausalLM.from_pretrained` (and so by lm-eval-harness and friends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lutq import __version__
from lutq.core.atomic import atomic_dir, atomic_write_json

EXPORT_META = "lutq_export.json"


def export_hf(
    model: nn.Module, tokenizer: Any, out: str | Path, *, dtype: torch.dtype | None = None, source: str = ""
) -> Path:
    """Dequantize `model` in place (LUT layers -> nn.Linear with W_eff) and save it as an HF directory."""
    from lutq.quant import dequantize_

    quantized = any(getattr(m, "lutq_quantized", False) for m in model.modules())
    if quantized:
        dequantize_(model)
    if dtype is not None:
        model = model.to(dtype)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / EXPORT_META,
            {
                "format": "hf",
                "source": source,
                "lutq_version": __version__,
                "dequantized": quantized,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            },
        )
    return out
