"""`lutq bench`: throughput, step time, peak memory, MFU, and the largest batch that fits.

Timing excludes data preload and eval (inputs are built before the clock starts); see `timing.py`.
"""

from lutq.bench.maxbatch import FakeOOM, MaxBatchResult, Probe, fake_memory_limit, find_max_batch, is_oom
from lutq.bench.timing import (
    DEVICE_PEAK_FLOPS,
    StepStats,
    cleanup,
    device_name,
    mfu,
    peak_flops,
    peak_memory_mb,
    time_steps,
    transformer_flops_per_token,
)

__all__ = [
    "DEVICE_PEAK_FLOPS",
    "FakeOOM",
    "MaxBatchResult",
    "Probe",
    "StepStats",
    "cleanup",
    "device_name",
    "fake_memory_limit",
    "find_max_batch",
    "is_oom",
    "mfu",
    "peak_flops",
    "peak_memory_mb",
    "time_steps",
    "transformer_flops_per_token",
]
