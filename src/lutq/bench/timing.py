"""Timing, memory and MFU helpers shared by every `lutq bench` measurement.

Accounting: only the steps themselves are timed. Inputs are built before the clock starts (no data
preload, no eval, no optimizer construction inside the timed region), `warmup` steps run untimed, and on
CUDA every timed step ends with `torch.cuda.synchronize()` so the wall time is the device's time.
"""

from __future__ import annotations

import gc
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Dense (no sparsity) peak FLOP/s per device and compute dtype; MFU is reported against these.
# "fp32" is the non-tensor-core FP32 rate (torch's default matmul precision does not use TF32).
# Matched by substring of the device name, first match wins (so "H100 PCIE" before "H100").
DEVICE_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIE": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
}


@dataclass
class StepStats:
    """One measured configuration: step time, throughput, peak memory, MFU (None where unknown)."""

    label: str
    batch: int
    seq_len: int
    steps: int
    step_s: float
    tokens_per_s: float
    peak_mem_mb: float | None = None
    mfu: float | None = None
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_name(device: Any) -> str:
    """Human-readable device name: the CUDA device name, or the CPU model."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name}, {torch.get_num_threads()} threads)"


def peak_flops(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a device (matched by substring of its name) for `dtype`; None for CPUs/unknown."""
    for key, peaks in DEVICE_PEAK_FLOPS.items():
        if key in name.upper().replace("NVIDIA ", "") and not name.startswith("CPU"):
            return peaks.get(dtype)
    return None


def mfu(flops_per_step: float, step_s: float, name: str, dtype: str) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the device's dense peak (None when no peak is known)."""
    peak = peak_flops(name, dtype)
    return None if peak is None or step_s <= 0 else flops_per_step / step_s / peak


def transformer_flops_per_token(n_params: int, n_layers: int, d_attn: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmul weights plus 12·layers·d_attn·L for attention
    scores and values (the PaLM appendix B convention, no causal halving)."""
    return 6.0 * n_params + 12.0 * n_layers * d_attn * seq_len


def reset_peak_memory(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: Any) -> float:
    """Peak memory in MB: `torch.cuda.max_memory_allocated` on CUDA, else the process's peak RSS."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: Any = None) -> None:
    """Free what a finished (or OOM-ed) probe left behind."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], Any], *, warmup: int, steps: int, device: Any = "cpu") -> tuple[float, float | None]:
    """Run `warmup` untimed then `steps` timed calls of `step()`; return (median seconds per step, last loss).

    `step()` may return a loss tensor/float; it is read only after the clock stops.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    out = None
    for _ in range(warmup):
        out = step()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    loss = float(out) if out is not None else None
    return statistics.median(times), loss


def profile_steps(step: Callable[[], Any], *, steps: int, device: Any, title: str, path: str, rows: int = 30) -> None:
    """Run `step()` `steps` times under torch.profiler and append the ops table (by self time on the device:
    CUDA kernels on a GPU, CPU time elsewhere) under `title` to the text file `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    with open(path, "a") as f:
        f.write(f"## {title}: {steps} steps, {n_ops / steps:,.0f} aten ops per step\n\n{table}\n\n")
