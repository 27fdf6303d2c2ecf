"""The learning-rate schedule: linear warmup, then cosine down to a floor (one home for it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup` steps ((step+1)/warmup, so step 0 already trains);
    then a cosine falls from 1 to `min_ratio` at step total-1 and stays there.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(*, total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """`lr_factor` bound to a run's numbers, for `torch.optim.lr_scheduler.LambdaLR`."""
    warmup = min(warmup, max(0, total - 1))

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=warmup, min_ratio=min_ratio)

    return factor


def make_scheduler(optimizer: Any, *, total: int, warmup: int, min_ratio: float) -> Any:
    """A LambdaLR over `optimizer` with warmup + cosine-to-floor; step it once per optimizer step."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda(total=total, warmup=warmup, min_ratio=min_ratio))


def rebase_scheduler(scheduler: Any, peak_lr: float) -> None:
    """After a resume loaded a saved LambdaLR + optimizer state: make the schedule this run's.

    `load_state_dict` brings back the saved peak (`base_lrs`, the groups' `initial_lr`) and the groups' lr for
    the saved step under the saved schedule, so a changed `--lr` would be ignored and a changed `--steps` /
    `--warmup` / `--min-lr-ratio` would only apply from the second resumed step. The peak becomes `peak_lr`
    and each group's lr what the (rebuilt) lambda gives at the saved step: the same floats as LambdaLR's own
    step, so an unchanged run resumes to the bit.
    """
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [peak_lr for _ in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
