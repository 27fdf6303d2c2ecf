"""find_max_batch against a fake memory limit (CPU), OOM classification, MFU/peak helpers."""

from __future__ import annotations

import pytest
import torch

from lutq.bench import FakeOOM, StepStats, fake_memory_limit, find_max_batch, is_oom, mfu, peak_flops
from lutq.core.errors import LutqError


def _fake_step(calls: list[int], best_at: int = 10_000):
    """Throughput grows with batch up to `best_at`, then drops (memory pressure), like the seed's RTX 5090 row."""

    def run(batch: int) -> StepStats:
        calls.append(batch)
        tps = batch * 100.0 if batch <= best_at else best_at * 100.0 - (batch - best_at) * 50.0
        return StepStats("fake", batch, 64, 2, batch * 64 / tps, tps)

    return run


@pytest.mark.parametrize(("limit", "expected"), [(504, 504), (507, 504), (143, 136), (8, 8), (9, 8), (1000, 512)])
def test_finds_largest_multiple_under_limit(limit: int, expected: int) -> None:
    calls: list[int] = []
    run = fake_memory_limit(_fake_step(calls), limit=limit, cost=float)
    res = find_max_batch(run, lo=8, hi=512, multiple=8, cleanup_fn=lambda: None)
    assert res.max_batch == expected
    assert res.hit_upper_bound == (expected == 512)
    assert all(b % 8 == 0 for b in calls) and len(res.probes) <= 2 + 7  # lo, hi, log2(512/8) bisection steps
    assert max(p.batch for p in res.probes if p.ok) == expected
    assert all(p.batch > limit for p in res.probes if not p.ok)
    assert calls == [p.batch for p in res.probes if p.ok]  # OOM probes never reach the step


def test_best_throughput_can_be_below_max() -> None:
    run = fake_memory_limit(_fake_step([], best_at=200), limit=215, cost=float)
    res = find_max_batch(run, lo=8, hi=512, multiple=8, cleanup_fn=lambda: None)
    assert res.max_batch == 208
    assert res.best.batch <= 200 and res.best.tokens_per_s == max(p.stats.tokens_per_s for p in res.probes if p.ok)
    d = res.to_dict()
    assert d["max_batch"] == 208 and d["best_batch"] == res.best.batch


def test_cleanup_runs_between_probes_and_real_errors_propagate() -> None:
    cleaned: list[int] = []
    run = fake_memory_limit(_fake_step([]), limit=100, cost=float)
    res = find_max_batch(run, 8, 256, cleanup_fn=lambda: cleaned.append(1))
    assert len(cleaned) == len(res.probes)

    def broken(batch: int) -> StepStats:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_max_batch(broken, 8, 64, cleanup_fn=lambda: None)


def test_lo_must_fit_and_bad_bounds() -> None:
    run = fake_memory_limit(_fake_step([]), limit=4, cost=float)
    with pytest.raises(LutqError, match="even the smallest batch 8"):
        find_max_batch(run, 8, 64, cleanup_fn=lambda: None)
    with pytest.raises(LutqError, match="lo <= hi"):
        find_max_batch(run, 64, 8)


def test_non_multiple_lo_and_runtime_oom_message() -> None:
    def run(batch: int) -> StepStats:
        if batch > 20:
            raise RuntimeError("CUDA error: out of memory while allocating")
        return StepStats("x", batch, 8, 1, 1.0, float(batch))

    res = find_max_batch(run, lo=3, hi=100, multiple=8, cleanup_fn=lambda: None)
    assert res.max_batch == 16
    assert any("out of memory" in p.error for p in res.probes if not p.ok)


def test_is_oom_classification() -> None:
    assert is_oom(FakeOOM("x"))
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ... out of memory"))
    assert not is_oom(RuntimeError("size mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_mfu_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("CPU (AMD EPYC, 2 threads)", "fp32") is None
    assert mfu(989e12 * 0.5, 1.0, "NVIDIA H100", "bf16") == pytest.approx(0.5)
    assert mfu(1e12, 1.0, "CPU (x)", "fp32") is None
