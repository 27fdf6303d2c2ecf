"""Cache-writing throughput against a bare teacher forward on the same tokens (`lutq bench` calls this).

Both are timed batch by batch, interleaved (bare, cache, cache, bare, ...), so a shared or throttling
machine slows both alike. The cache step is the writer's: `teacher_targets` (forward, top-K, negatives),
the copy to the host, and an atomic safetensors shard write. On a busy machine the end-to-end `ratio` is
noisy; `overhead` (the writer's work after the forward, timed alone on the bare forward's logits, over
the bare forward time) is the steadier number: the expected ratio is 1 / (1 + overhead).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch


def bench_cache(
    model: str | torch.nn.Module = "smollm2-135m-instruct",
    L: int = 128,
    K: int = 64,
    batch: int = 8,
    n_batches: int = 4,
    *,
    R: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens/s of cache writing vs a bare forward; `ratio` = cache / bare (target >= 0.9). `model` may be
    "shape:NAME": random weights of a `lutq bench qat` shape (e.g. shape:smollm2-135m), nothing to fetch."""
    from lutq.kd.cache import _logits_size, negative_uniforms, resolve_device_dtype

    if isinstance(model, str):
        dev, dt = resolve_device_dtype(device, dtype)
        if model.startswith("shape:"):
            from lutq.bench.qat import build_model

            model = build_model(model.removeprefix("shape:"), str(dev)).to(dt).eval()
        else:
            from lutq.models import load_model

            model, _ = load_model(model, dtype=dt, device=dev)
    dev = next(model.parameters()).device
    V = _logits_size(model)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, V, (warmup + n_batches, batch, L), generator=gen, dtype=torch.long)
    bare_s = cache_s = post_s = 0.0
    shard_bytes = 0
    with tempfile.TemporaryDirectory(prefix="lutq-bench-cache-") as tmp:
        for i in range(warmup + n_batches):
            x = data[i].to(dev)
            rows = range(i * batch, (i + 1) * batch)
            u = negative_uniforms(seed, "train", rows, L - 1, R, dev) if R else None
            path = Path(tmp) / f"bench-{i}.safetensors"
            if i % 2:  # alternate the order (ABBA) so a drifting machine load favours neither
                t_cache, nbytes = _timed(partial(_cache_step, model, x, K, R, u, path), dev)
            t_bare, logits = _timed(partial(_bare_forward, model, x), dev)
            t_post, _ = _timed(partial(_after_forward, logits, x, K, R, u, path), dev)
            del logits
            if not i % 2:
                t_cache, nbytes = _timed(partial(_cache_step, model, x, K, R, u, path), dev)
            if i >= warmup:
                bare_s, cache_s, post_s = bare_s + t_bare, cache_s + t_cache, post_s + t_post
                shard_bytes += nbytes
    tokens = n_batches * batch * L
    bare_tps, cache_tps = tokens / bare_s, tokens / cache_s
    return {
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "L": L,
        "K": K,
        "R": R,
        "batch": batch,
        "batches": n_batches,
        "tokens": tokens,
        "bare_tokens_per_s": bare_tps,
        "cache_tokens_per_s": cache_tps,
        "ratio": cache_tps / bare_tps,
        "overhead": post_s / bare_s,
        "ratio_from_overhead": bare_s / (bare_s + post_s),
        "bytes_per_token": shard_bytes / tokens,
        "threads": torch.get_num_threads(),
    }


def _cache_step(model: torch.nn.Module, x: torch.Tensor, K: int, R: int, u: torch.Tensor | None, path: Path) -> int:
    """The writer's work for one batch: forward, targets, host copy, atomic shard write; returns bytes."""
    from lutq.kd.cache import teacher_targets

    return _store(x, teacher_targets(model, x, K, R, u), path)


def _after_forward(logits: torch.Tensor, x: torch.Tensor, K: int, R: int, u: torch.Tensor | None, path: Path) -> int:
    """The writer's work after the forward (top-K, negatives, host copy, write)."""
    from lutq.kd.cache import targets_from_logits

    return _store(x, targets_from_logits(logits, K, R, u), path)


def _store(x: torch.Tensor, targets: dict[str, torch.Tensor], path: Path) -> int:
    from lutq.kd.shards import write_shard

    arrays = {"input_ids": x.to(torch.int32).cpu().numpy()}
    arrays.update({k: v.cpu().numpy() for k, v in targets.items()})
    write_shard(path, arrays)
    return sum(a.nbytes for a in arrays.values())


@torch.inference_mode()
def _bare_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


def _timed(fn: Any, dev: torch.device) -> tuple[float, Any]:
    """(wall time, result) of fn(), waiting for the device before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    result = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, result
