"""Model size in the terms users compare: MB and bits per weight (indices + LUT + scales for LUT layers,
the storage dtype for everything else), from `lutq.quant.storage.size_report`."""

from __future__ import annotations

from typing import Any

from torch import nn


def model_size(model: nn.Module) -> dict[str, Any]:
    """{total: {params, size_mb, bits_per_weight} (whole model), lut: {layers, weights, bits_per_weight} of the
    LUT layers (None for an FP model), groups: {group: {layers, weights, bits_per_weight}}, report: the raw
    `size_report`}. Dense tensors count at their storage dtype (16 / 32 bits)."""
    from lutq.quant.storage import size_report

    rep = size_report(model)
    q = rep["quantized"]
    params = q["weights"] + rep["other_params"]
    bits = q["bits"] + 8 * rep["other_bytes"]
    return {
        "total": {
            "params": params,
            "size_mb": rep["total_bytes"] / 1e6,
            "bits_per_weight": bits / params if params else 0.0,
        },
        "lut": {"layers": q["layers"], "weights": q["weights"], "bits_per_weight": q["bits_per_weight"]}
        if q["weights"]
        else None,
        "groups": {
            g: {"layers": v["layers"], "weights": v["weights"], "bits_per_weight": v["bits_per_weight"]}
            for g, v in rep["groups"].items()
        },
        "report": rep,
    }


def size_table(size: dict[str, Any], title: str = "size") -> Any:
    """A rich Table of `model_size(...)`: one row per LUT group, the quantized layers, the whole model."""
    from rich.table import Table

    rep = size["report"]
    t = Table(title=title)
    for col in ("part", "layers", "weights", "bits/weight", "MB"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for g, v in rep["groups"].items():
        t.add_row(g, str(v["layers"]), f"{v['weights']:,}", f"{v['bits_per_weight']:.3f}", f"{v['bits'] / 8e6:.2f}")
    q = rep["quantized"]
    if q["weights"]:
        t.add_row(
            "LUT layers", str(q["layers"]), f"{q['weights']:,}", f"{q['bits_per_weight']:.3f}", f"{q['bits'] / 8e6:.2f}"
        )
    if rep["other_params"]:
        t.add_row(
            "other (dense)",
            "",
            f"{rep['other_params']:,}",
            f"{8 * rep['other_bytes'] / rep['other_params']:.1f}",
            f"{rep['other_bytes'] / 1e6:.2f}",
        )
    total = size["total"]
    t.add_row(
        "[bold]whole model",
        "",
        f"{total['params']:,}",
        f"[bold]{total['bits_per_weight']:.3f}",
        f"[bold]{total['size_mb']:.2f}",
    )
    return t
