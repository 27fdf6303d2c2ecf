"""Model FLOPs utilization for pretraining: achieved training FLOPs / the device's dense bf16 peak.

Training FLOPs per token come from `lutq.pretrain.model.flops_per_token` (6·N + attention). The device peak
table has one home, `lutq.bench.timing.DEVICE_PEAK_FLOPS` (dense, not sparse); on a CPU or an unknown GPU
MFU is n/a.
"""

from __future__ import annotations

import torch

from lutq.bench.timing import device_name as _bench_device_name
from lutq.bench.timing import peak_flops as _bench_peak_flops


def device_name(device: torch.device | str) -> str:
    """Human-readable device name (CUDA device name, or the CPU model and thread count)."""
    return _bench_device_name(device)


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of `device` in FLOP/s, or None (CPU, unknown GPU)."""
    if torch.device(device).type != "cuda":
        return None
    return _bench_peak_flops(device_name(device), "bf16")


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Fraction of the peak achieved (None when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)
