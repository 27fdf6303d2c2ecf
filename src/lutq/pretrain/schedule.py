"""Token-budget arithmetic of a pretraining run: K/M/B counts, the sequence-length schedule
("512@0,1024@2000"), tokens planned for a step count, and the step count that reaches a token target.

Steps are 0-based optimizer step indices. The sequence length of step i is the one of the last schedule
entry whose start is <= i; before the first entry (or with no schedule) the default length applies.
Every optimizer step consumes `global_batch x seq_len` tokens (fixed-length windows, no padding).
"""

from __future__ import annotations

import math
import re

from lutq.core.errors import LutqError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMBGT]?)\s*$", re.IGNORECASE)

Schedule = list[tuple[int, int]]  # [(seq_len, start_step), ...] sorted by start_step


def parse_count(text: str | int, what: str = "count") -> int:
    """'100M' -> 100_000_000, '1.5B' -> 1_500_000_000, '2000' -> 2000 (K/M/B are decimal)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise LutqError(f"{what} {text!r}: expected a number with an optional K/M/B suffix, e.g. 100M or 1.5B")
        value = round(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise LutqError(f"{what} {text!r} must be positive")
    return value


def format_count(n: float) -> str:
    """1_500_000_000 -> '1.500B', 491_520_000 -> '491.52M'."""
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}B" if suffix == "B" else f"{n / div:.2f}{suffix}"
    return f"{n:g}"


def parse_seq_schedule(text: str | None) -> Schedule:
    """'512@0,1024@2000' -> [(512, 0), (1024, 2000)]; '' or None -> []. Malformed items are errors."""
    if not text or not text.strip():
        return []
    out: Schedule = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*@\s*(\d+)\s*", item)
        if not m:
            raise LutqError(f"seq schedule {text!r}: item {item.strip()!r} is not LEN@STEP (e.g. 1024@2000)")
        seq_len, start = int(m.group(1)), int(m.group(2))
        if seq_len < 2:
            raise LutqError(f"seq schedule {text!r}: sequence length {seq_len} must be at least 2")
        out.append((seq_len, start))
    out.sort(key=lambda e: e[1])
    starts = [s for _, s in out]
    if len(set(starts)) != len(starts):
        raise LutqError(f"seq schedule {text!r}: two entries start at the same step")
    return out


def seq_len_for_step(step: int, schedule: Schedule, default: int) -> int:
    """Sequence length of 0-based optimizer step `step`."""
    seq = default
    for seq_len, start in schedule:
        if start <= step:
            seq = seq_len
        else:
            break
    return seq


def max_seq_len(schedule: Schedule, default: int, steps: int | None = None) -> int:
    """The longest sequence length the run will use (only entries starting before `steps` count)."""
    lens = [default] if not schedule or schedule[0][1] > 0 else []
    lens += [s for s, start in schedule if steps is None or start < steps]
    return max(lens)


def _segments(schedule: Schedule, default: int) -> list[tuple[int, int]]:
    """[(start_step, seq_len), ...] covering step 0 onwards."""
    segs = [(0, default)] if not schedule or schedule[0][1] > 0 else []
    segs += [(start, seq) for seq, start in schedule]
    return segs


def segments(steps: int, schedule: Schedule, default: int) -> list[tuple[int, int, int]]:
    """The run cut into constant-length pieces: [(first step, end step (exclusive), seq_len), ...]."""
    segs = _segments(schedule, default)
    out = []
    for i, (start, seq) in enumerate(segs):
        end = min(segs[i + 1][0] if i + 1 < len(segs) else steps, steps)
        if end > start:
            out.append((start, end, seq))
    return out


def planned_tokens(steps: int, global_batch: int, schedule: Schedule, default: int) -> int:
    """Tokens consumed by `steps` optimizer steps."""
    return sum((end - start) * global_batch * seq for start, end, seq in segments(steps, schedule, default))


def steps_for_tokens(target: int, global_batch: int, schedule: Schedule, default: int) -> int:
    """The smallest step count whose planned tokens are >= `target`."""
    if target <= 0:
        raise LutqError(f"target tokens must be positive, got {target}")
    if global_batch <= 0:
        raise LutqError(f"global batch must be positive, got {global_batch}")
    segs = _segments(schedule, default)
    remaining = target
    for i, (start, seq) in enumerate(segs):
        per_step = global_batch * seq
        length = segs[i + 1][0] - start if i + 1 < len(segs) else math.inf
        if remaining <= per_step * length:
            return start + math.ceil(remaining / per_step)
        remaining -= per_step * length
    raise AssertionError("unreachable: the last segment is unbounded")
