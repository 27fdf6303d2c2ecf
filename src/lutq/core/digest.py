"""Fingerprints of large arrays that read only a sample of them."""

from __future__ import annotations

import numpy as np


def spaced_indices(total: int, count: int) -> np.ndarray:
    """`min(count, total)` evenly spaced positions in [0, total), the first and the last included, in int64
    arithmetic: a float32 linspace rounds past the end of a 28M-element tensor."""
    n = min(count, total)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    return np.arange(n, dtype=np.int64) * (total - 1) // (n - 1)
