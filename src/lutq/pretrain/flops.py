"""Model FLOPs utilization: achieved training FLOPs / the device's dense bf16 peak.

Training FLOPs per token come from `lutq.pretrain.model.flops_per_token` (6·N + attention). The peak table
lists dense (not sparse) bf16 tensor-core throughput per GPU; on a CPU (or an unknown GPU) MFU is n/a.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name, dense bf16 peak FLOP/s); first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (and NVL per GPU is higher; SXM is the conservative figure)
    ("A100", 312e12),
)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of `device` in FLOP/s, or None (CPU, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Fraction of the peak achieved (None when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)
