"""How far a perplexity could move on other text of the same kind: confidence intervals, one home.

The sampling unit is the scored segment of a sliding window (the tokens a window scores, `stride` of them,
contiguous), not the token: tokens of one passage rise and fall together, so treating them as independent would
understate the error several-fold. Mean NLL is a ratio (Σ segment NLL / Σ segment tokens); its standard error
is the ratio (cluster) estimator's, se = sqrt(n / (n − 1) · Σ (S_i − m·C_i)²) / Σ C_i, and intervals use
Student's t with n − 1 degrees of freedom. Neighbouring segments of one document are still a little
correlated, so read the intervals as a floor on the uncertainty, not a guarantee.

Two models scored on the same tokens (same tokenizer and text, so the same segments) are compared *paired*:
the per-segment difference of their NLLs cancels how hard each passage is, and the interval of the ratio
ppl_b / ppl_a = exp(Δ) is far narrower than either perplexity's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

LEVEL = 0.95  # the confidence level lutq reports everywhere


def t_quantile(p: float, dof: int) -> float:
    """Quantile `p` of Student's t with `dof` degrees of freedom (exact for 1 and 2, otherwise the
    Cornish-Fisher expansion to 1/dof⁴: within 0.2 % of the exact value for dof ≥ 3 at p = 0.975).
    Hand-rolled because scipy is not a dependency for one function."""
    if dof < 1:
        raise ValueError(f"t_quantile needs dof >= 1, got {dof}")
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def ratio_se(sums: Sequence[float], counts: Sequence[int]) -> float | None:
    """Standard error of Σ sums / Σ counts over n units (the ratio estimator); None for fewer than 2 units."""
    if len(sums) != len(counts):
        raise ValueError(f"ratio_se: {len(sums)} sums for {len(counts)} counts")
    n, total = len(sums), float(sum(counts))
    if n < 2 or total <= 0:
        return None
    mean = sum(sums) / total
    ss = sum((s - mean * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return math.sqrt(n / (n - 1) * ss) / total


def mean_interval(sums: Sequence[float], counts: Sequence[int], level: float = LEVEL) -> tuple[float, float] | None:
    """(low, high) of the token-weighted mean Σ sums / Σ counts at confidence `level`; None for < 2 units."""
    se = ratio_se(sums, counts)
    if se is None:
        return None
    mean = sum(sums) / sum(counts)
    half = t_quantile(0.5 + level / 2, len(counts) - 1) * se
    return mean - half, mean + half


def ppl_interval(nll_sums: Sequence[float], tokens: Sequence[int], level: float = LEVEL) -> tuple[float, float] | None:
    """(low, high) perplexity at confidence `level` from per-segment NLL sums and token counts; None for < 2."""
    nll = mean_interval(nll_sums, tokens, level)
    return None if nll is None else (_exp(nll[0]), _exp(nll[1]))


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising OverflowError (a diverged model's upper bound)."""
    return math.inf if x > 709.0 else math.exp(x)


def paired_ppl_ratio(
    ref_sums: Sequence[float], sums: Sequence[float], tokens: Sequence[int], level: float = LEVEL
) -> tuple[float, float | None, float | None]:
    """(ratio, low, high): ppl of `sums` over ppl of `ref_sums`, both scored on the same segments (`tokens`),
    with its paired interval at `level` (low and high None for fewer than 2 segments): exp of the paired NLL
    difference (`paired_mean_diff`)."""
    delta, low, high = paired_mean_diff(ref_sums, sums, tokens, level)
    return _exp(delta), None if low is None else _exp(low), None if high is None else _exp(high)


def paired_mean_diff(
    ref_sums: Sequence[float], sums: Sequence[float], counts: Sequence[int], level: float = LEVEL
) -> tuple[float, float | None, float | None]:
    """(diff, low, high): the token-weighted mean of `sums` minus that of `ref_sums`, both over the same units
    (`counts`: a perplexity's segments, the same KD batches), with its paired interval at `level` (None bounds
    for < 2 units)."""
    if not len(ref_sums) == len(sums) == len(counts):
        raise ValueError(f"paired: {len(ref_sums)}, {len(sums)} and {len(counts)} units (segments, batches) differ")
    if sum(counts) <= 0:
        raise ValueError("paired: the units hold no tokens")
    diffs = [b - a for a, b in zip(ref_sums, sums, strict=True)]
    interval = mean_interval(diffs, counts, level)
    diff = sum(diffs) / sum(counts)
    return (diff, None, None) if interval is None else (diff, *interval)


def format_change(ratio: float, low: float | None, high: float | None) -> str:
    """'+11.4 % [+10.2, +12.6]': a ratio as a percent change with its interval."""
    pct = [None if r is None else (r - 1) * 100 for r in (low, high)]
    return format_diff((ratio - 1) * 100, *pct, digits=1, unit=" %")


def format_diff(diff: float, low: float | None, high: float | None, digits: int = 4, unit: str = "") -> str:
    """'-0.0171 [-0.0200, -0.0142]': a difference (then `unit`) with its interval."""
    cell = f"{diff:+.{digits}f}{unit}"
    if low is not None and high is not None:
        cell += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return cell
