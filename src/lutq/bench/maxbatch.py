"""Binary search for the largest batch that fits in memory, plus the batch with the best throughput.

`run_step(batch)` runs a few training steps at that batch and returns their `StepStats`; running out of
memory (CUDA OOM, a RuntimeError saying "out of memory", or `FakeOOM`) marks the batch as too big, and
anything else is a real error that propagates. Memory is cleaned up between probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lutq.bench.timing import StepStats, cleanup
from lutq.core.errors import LutqError


class FakeOOM(RuntimeError):
    """Raised by a simulated memory limit (tests, dry runs) exactly where a real OOM would be."""


# What torch's allocators say when an allocation fails: CUDA and MPS say "out of memory"; the CPU allocator
# says "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12 (Cannot
# allocate memory)".
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors from torch (CUDA, MPS, CPU allocator) or a `FakeOOM`."""
    if isinstance(exc, FakeOOM):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in OOM_MESSAGES)


@dataclass
class Probe:
    batch: int
    ok: bool
    stats: StepStats | None = None
    error: str = ""


@dataclass
class MaxBatchResult:
    """`max_batch`: largest batch that ran; `best`: the probe with the highest tokens/s; all probes in order."""

    max_batch: int
    best: StepStats
    probes: list[Probe] = field(default_factory=list)
    hit_upper_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "best_batch": self.best.batch,
            "best_tokens_per_s": self.best.tokens_per_s,
            "hit_upper_bound": self.hit_upper_bound,
            "probes": [
                {"batch": p.batch, "ok": p.ok, "error": p.error, "stats": p.stats.to_dict() if p.stats else None}
                for p in self.probes
            ],
        }


def find_max_batch(
    run_step: Callable[[int], StepStats],
    lo: int,
    hi: int,
    multiple: int = 8,
    *,
    on_probe: Callable[[Probe], None] | None = None,
    cleanup_fn: Callable[[], None] = cleanup,
) -> MaxBatchResult:
    """Largest batch in [lo, hi] (a multiple of `multiple`, or `lo` itself) for which `run_step` does not OOM.

    Probes `lo` (must fit), then `hi` (if it fits the search ends: `hit_upper_bound`), then bisects.
    Each probe's stats are kept; `best` is the fastest (tokens/s) of the batches that ran.
    """
    if lo < 1 or hi < lo or multiple < 1:
        raise LutqError(
            f"find_max_batch: need 1 <= lo <= hi and multiple >= 1 (got lo={lo}, hi={hi}, multiple={multiple})"
        )
    probes: list[Probe] = []

    def probe(batch: int) -> bool:
        err = ""
        try:
            stats = run_step(batch)
        except Exception as e:
            if not is_oom(e):
                raise
            stats, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        # the exception (and the frames holding its tensors) is gone here, so memory can be released
        cleanup_fn()
        p = Probe(batch, stats is not None, stats, err)
        probes.append(p)
        if on_probe:
            on_probe(p)
        return p.ok

    if not probe(lo):
        raise LutqError(f"find_max_batch: even the smallest batch {lo} runs out of memory ({probes[0].error})")
    good = lo
    hi_k, lo_k = hi // multiple, -(-lo // multiple)  # candidates are multiples: k * multiple
    hit = False
    if hi_k * multiple > lo:
        if probe(hi_k * multiple):
            good, hit = hi_k * multiple, True
        else:
            lo_k = max(lo_k, 1)
            if lo_k * multiple == lo:
                lo_k += 1  # lo already probed
            # invariant: every k < lo_k fits (or is below lo), hi_k does not fit
            while lo_k < hi_k:
                mid = (lo_k + hi_k) // 2
                if probe(mid * multiple):
                    good, lo_k = mid * multiple, mid + 1
                else:
                    hi_k = mid
    ok = [p.stats for p in probes if p.ok and p.stats is not None]
    best = max(ok, key=lambda s: s.tokens_per_s)
    return MaxBatchResult(max_batch=good, best=best, probes=probes, hit_upper_bound=hit)


def fake_memory_limit(
    run_step: Callable[[int], StepStats], limit: float, cost: Callable[[int], float]
) -> Callable[[int], StepStats]:
    """Wrap `run_step` so that batches whose `cost(batch)` exceeds `limit` raise `FakeOOM` before running:
    exercises the search (and a CLI dry run) on a machine without the memory ceiling of a GPU."""

    def wrapped(batch: int) -> StepStats:
        if cost(batch) > limit:
            raise FakeOOM(f"CUDA out of memory (simulated): batch {batch} needs {cost(batch):.0f} > {limit:.0f}")
        return run_step(batch)

    return wrapped
