"""`lutq cache verify DIR`: check a cache's shards against their checksums and re-run the teacher on a
few sequences to check the stored logits.

For each checked position the stored logits are compared with the teacher's logits *at the stored ids*
(so ties that reorder do not matter), the stored ids must be a top-K set of the recomputed logits (every
stored id's logit at least the K-th largest minus the tolerance), and the stored negatives' logits must
match too, as must the stored log-sum-exp of all the teacher's logits (`teacher_lse`, when cached).
Tolerance: fp16 storage of an fp32 teacher is within |x|·2⁻¹¹; when either side ran in bf16
the default tolerance is wider (atol 0.5, rtol 2⁻⁶).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lutq.core import LutqError


def verify_cache(
    path: str | Path,
    n: int = 4,
    *,
    teacher: tuple[torch.nn.Module, Any] | None = None,
    device: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Re-run the teacher on `n` sequences (spread over train and val) and compare; returns a report
    dict whose `ok` says whether everything matched within tolerance."""
    from lutq.kd.cache import config_from_meta, load_teacher, stored_lse
    from lutq.kd.reader import KDCache

    cache = KDCache(path)
    cache.verify_checksums()
    meta = cache.meta
    missing = [key for key in ("settings", "teacher_dtype") if key not in meta]
    if missing:
        raise LutqError(
            f"{cache.path / 'meta.json'}: missing key(s) {missing}, which verify needs to re-run the "
            "teacher as the cache was built"
        )
    model, tokenizer = teacher or load_teacher(config_from_meta(meta).replace(device=device, dtype="auto"))
    cache.check_tokenizer(tokenizer)
    dtype = next(model.parameters()).dtype
    low_precision = dtype != torch.float32 or meta["teacher_dtype"] != "float32"
    atol = atol if atol is not None else (0.5 if low_precision else 1e-3)
    rtol = rtol if rtol is not None else (2**-6 if low_precision else 2**-10)
    dev = next(model.parameters()).device

    stats = {
        "positions": 0,
        "max_abs_diff": 0.0,
        "sum_abs_diff": 0.0,
        "top1_match": 0,
        "topk_set_ok": 0,
        "bad_positions": 0,
        "neg_max_abs_diff": 0.0,
        "lse_max_abs_diff": 0.0,
    }
    picks = _pick(cache, n)
    for split, idx in picks.items():
        batch = cache.read(split, idx)
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"].to(dev), use_cache=False).logits[:, :-1].float().cpu()
        _compare(logits, batch["topk_ids"], batch["topk_logits"], atol, rtol, stats)
        if "neg_ids" in batch:
            ref = logits.gather(-1, batch["neg_ids"])
            stats["neg_max_abs_diff"] = max(stats["neg_max_abs_diff"], (batch["neg_logits"] - ref).abs().max().item())
            stats["bad_positions"] += int(((batch["neg_logits"] - ref).abs() > atol + rtol * ref.abs()).any(-1).sum())
        if "teacher_lse" in batch:
            ref = stored_lse(logits, logits.gather(-1, batch["topk_ids"]), batch["topk_logits"])
            diff = (batch["teacher_lse"] - ref).abs()
            stats["lse_max_abs_diff"] = max(stats["lse_max_abs_diff"], diff.max().item())
            stats["bad_positions"] += int((diff > atol + rtol * ref.abs()).sum())
    positions = stats["positions"]
    return {
        "path": str(cache.path),
        "checksums": "ok",
        "sequences": {s: [int(i) for i in v] for s, v in picks.items()},
        "positions": positions,
        "max_abs_diff": stats["max_abs_diff"],
        "mean_abs_diff": stats["sum_abs_diff"] / max(positions * cache.K, 1),
        "top1_match": stats["top1_match"] / max(positions, 1),
        "topk_set_ok": stats["topk_set_ok"] / max(positions, 1),
        "neg_max_abs_diff": stats["neg_max_abs_diff"] if cache.R else None,
        "lse_max_abs_diff": stats["lse_max_abs_diff"] if cache.has_teacher_lse else None,
        "atol": atol,
        "rtol": rtol,
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "ok": stats["bad_positions"] == 0 and positions > 0,
    }


def _pick(cache: Any, n: int) -> dict[str, np.ndarray]:
    """n sequences spread evenly over train, then val (at least one from val when it has any)."""
    counts = {s: cache.num_sequences(s) for s in ("train", "val")}
    n_val = min(counts["val"], max(1 if counts["val"] else 0, n // 4))
    n_train = min(counts["train"], n - n_val)
    if n < 1 or n_train + n_val == 0:
        raise LutqError(f"{cache.path}: nothing to verify (n={n})")
    out = {}
    for split, k in (("train", n_train), ("val", n_val)):
        if k:
            out[split] = np.unique(np.linspace(0, counts[split] - 1, k).round().astype(np.int64))
    return out


def _compare(
    logits: torch.Tensor, ids: torch.Tensor, stored: torch.Tensor, atol: float, rtol: float, stats: dict[str, Any]
) -> None:
    ref = logits.gather(-1, ids)  # the teacher's logits at the stored ids
    diff = (stored - ref).abs()
    tol = atol + rtol * ref.abs()
    kth = logits.topk(ids.shape[-1], dim=-1).values[..., -1:]
    set_ok = (ref >= kth - tol).all(-1)
    stats["positions"] += ids.shape[0] * ids.shape[1]
    stats["max_abs_diff"] = max(stats["max_abs_diff"], diff.max().item())
    stats["sum_abs_diff"] += diff.sum().item()
    stats["top1_match"] += int((logits.argmax(-1) == ids[..., 0]).sum())
    stats["topk_set_ok"] += int(set_ok.sum())
    stats["bad_positions"] += int(((diff > tol).any(-1) | ~set_ok).sum())
