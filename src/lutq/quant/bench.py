"""Timing of one LUTLinear training step (forward + backward) against nn.Linear of the same shape.

`lutq bench` calls `bench_lut_linear`; the figures go to docs/benchmarks.md (`## quant`).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from lutq.quant.init import init_from_weight_
from lutq.quant.layer import LUTLinear


def _step_ms(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Wall time (ms) of y = layer(x); y.backward(dy) with fresh grads."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    layer(x).backward(dy)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _median_ms(
    layers: dict[str, nn.Module], x: torch.Tensor, dy: torch.Tensor, steps: int, warmup: int
) -> dict[str, float]:
    """Median step time per layer; the layers take turns step by step, so a noisy (shared) machine
    slows them alike and the ratios stay meaningful."""
    times: dict[str, list[float]] = {k: [] for k in layers}
    for i in range(warmup + steps):
        for name, layer in layers.items():
            t = _step_ms(layer, x, dy)
            if i >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_lut_linear(
    out_features: int = 3072,
    in_features: int = 1024,
    tokens: int = 2048,
    rank: int = 32,
    lut_size: int = 4,
    steps: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    warmup: int = 1,
    factored_steps: int = 1,
    compile: bool = False,
) -> dict[str, Any]:
    """Median training-step time of nn.Linear, LUTLinear (materialized W_eff) and LUTLinear(factored=True).

    Ratios are LUT / dense; `factored_steps=0` skips the factored form (r× the FLOPs and activations).
    `compile` adds `compiled` (torch.compile of the materialized layer: W_eff's elementwise chain fused).
    The input requires grad, as inside a network, so every variant also computes dL/dx.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False).to(device=device, dtype=dtype)
    lut = LUTLinear(in_features, out_features, lut_size, rank, device=device, dtype=dtype)
    init_from_weight_(lut, dense.weight.detach())
    x = torch.randn(tokens, in_features, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(tokens, out_features, generator=gen).to(device=device, dtype=dtype)
    result: dict[str, Any] = {
        "out_features": out_features,
        "in_features": in_features,
        "tokens": tokens,
        "rank": rank,
        "lut_size": lut_size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    layers: dict[str, nn.Module] = {"dense": dense, "materialized": lut}
    if compile:
        layers["compiled"] = torch.compile(lut)
    result.update({f"{k}_ms": v for k, v in _median_ms(layers, x, dy, steps, warmup).items()})
    for k in list(layers)[1:]:
        result[f"{k}_ratio"] = result[f"{k}_ms"] / result["dense_ms"]
    if factored_steps > 0:
        factored = copy.deepcopy(lut)
        factored.factored = True
        result["factored_ms"] = _median_ms({"f": factored}, x, dy, factored_steps, min(warmup, 1))["f"]
        result["factored_ratio"] = result["factored_ms"] / result["dense_ms"]
    return result
