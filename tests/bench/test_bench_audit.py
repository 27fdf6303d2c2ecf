"""Audit of `lutq bench`: the CPU allocator's out-of-memory error in the batch search, option checks that
come before any model is built, and the CPU peak memory of `bench pretrain` on macOS."""

from __future__ import annotations

import resource
from types import SimpleNamespace

import pytest
import torch

from lutq.bench import StepStats, find_max_batch, is_oom, timing
from lutq.bench.qat import QATBenchConfig
from lutq.core.errors import LutqError
from lutq.pretrain.bench import bench_pretrain


def _cpu_oom() -> RuntimeError:
    """The error torch's CPU allocator really raises (an allocation of 1 PiB)."""
    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    pytest.skip("this machine allocated 1 PiB")


def test_cpu_allocator_oom_is_a_batch_that_does_not_fit() -> None:
    """The CPU allocator says "can't allocate memory", not "out of memory": `--find-max-batch` on a CPU
    treated it as a real bug and crashed instead of bisecting below it."""
    err = _cpu_oom()
    assert "can't allocate memory" in str(err) and is_oom(err)

    def run(batch: int) -> StepStats:
        if batch > 40:
            torch.empty(2**50, dtype=torch.uint8)  # the genuine allocation failure
        return StepStats("cpu", batch, 8, 1, 1.0, float(batch))

    res = find_max_batch(run, lo=8, hi=256, multiple=8, cleanup_fn=lambda: None)
    assert res.max_batch == 40 and not res.hit_upper_bound
    assert all(p.batch > 40 for p in res.probes if not p.ok) and any("allocate memory" in p.error for p in res.probes)
    assert max(p.batch for p in res.probes if p.ok) == 40  # never reports a batch that failed
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("can't allocate memory"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"find_max_batch": True, "max_batch_hi": 4}, "--max-batch 4 is below the search's smallest batch 8"),
        ({"warmup": -1}, "--warmup must be >= 0"),
    ],
)
def test_bench_qat_checks_options_before_building_the_model(kw: dict, match: str) -> None:
    """`--find-max-batch --max-batch 4` built the model, then failed inside the search with
    "need 1 <= lo <= hi (got lo=8, ...)", a bound the user never set."""
    with pytest.raises(LutqError, match=match):
        QATBenchConfig(shape="tiny", device="cpu", **kw).resolved()


@pytest.mark.parametrize("kw", [{"micro_batch": 0}, {"seq_len": 0}])
def test_bench_pretrain_refuses_empty_batches(kw: dict) -> None:
    """--micro-batch 0 / --seq-len 0 reached the model and died in a reshape of 0 elements."""
    args = {"seq_len": 8, "micro_batch": 1} | kw
    with pytest.raises(LutqError, match="--seq-len and --micro-batch >= 1"):
        bench_pretrain("tiny", steps=1, warmup=0, device="cpu", vocab_size=300, **args)


def test_bench_pretrain_cpu_peak_memory_is_bytes_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """ru_maxrss is KiB on Linux but bytes on macOS; `bench pretrain` multiplied by 1024 everywhere."""
    monkeypatch.setattr(timing, "sys", SimpleNamespace(platform="darwin"))  # not the real sys: imports read it
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=300 * 2**20))
    tiny = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}
    res = bench_pretrain("tiny", seq_len=8, micro_batch=1, steps=1, warmup=0, device="cpu", vocab_size=300, **tiny)
    assert res["peak_mem_bytes"] == 300 * 2**20
