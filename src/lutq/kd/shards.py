"""The KD cache's on-disk pieces: shard files (safetensors, read back as numpy memmaps) and names.

A shard is one safetensors file holding, for its n sequences:
`input_ids` int32 [n, L], `topk_ids` int32 [n, L-1, K], `topk_logits` fp16 [n, L-1, K] (raw teacher
logits, sorted descending), `teacher_lse` fp32 [n, L-1] (the teacher's log-sum-exp over the whole vocabulary
with the top-K at their stored fp16 values, `lutq.kd.cache.stored_lse`: topk_logits - teacher_lse are its
log-probabilities and, with the tail, sum to 1; caches built before it was added lack it) and,
when R > 0, `neg_ids` int32 / `neg_logits` fp16 [n, L-1, R].
safetensors is a JSON header plus raw little-endian arrays, so every array maps straight from disk.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from lutq.core.atomic import atomic_write_bytes
from lutq.core.errors import LutqError

FORMAT = "lutq-kd-cache"
FORMAT_VERSION = 1
META = "meta.json"
PROGRESS = "progress.json"
BUILD_LOG = "build.json"
ARRAY_DTYPES = {
    "input_ids": "int32",
    "topk_ids": "int32",
    "topk_logits": "float16",
    "teacher_lse": "float32",
    "neg_ids": "int32",
    "neg_logits": "float16",
}
_ST_DTYPES = {"I32": np.int32, "F16": np.float16, "F32": np.float32, "I64": np.int64, "U16": np.uint16, "U8": np.uint8}


def shard_file(split: str, index: int) -> str:
    """File name of a split's index-th shard, e.g. 'train-00003.safetensors'."""
    return f"{split}-{index:05d}.safetensors"


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write one shard atomically (temp + rename); return its sha256."""
    from safetensors.numpy import save

    for name, a in arrays.items():
        if str(a.dtype) != ARRAY_DTYPES[name]:
            raise ValueError(f"shard array {name} has dtype {a.dtype}, expected {ARRAY_DTYPES[name]}")
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def open_shard(path: Path) -> dict[str, np.memmap]:
    """Memory-map every array of a shard (read-only); a malformed file is a LutqError naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
        start = 8 + n
        out: dict[str, np.memmap] = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            if start + end > size:
                raise ValueError(f"array {name} runs past the end of the file (truncated)")
            out[name] = np.memmap(
                path, dtype=_ST_DTYPES[spec["dtype"]], mode="r", offset=start + begin, shape=tuple(spec["shape"])
            )
        return out
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise LutqError(f"KD cache shard {path} is unreadable ({e}); rebuild it with `lutq cache`") from e


def check_shard(path: Path, arrays: dict[str, np.memmap], names: list[str], n: int, L: int, K: int, R: int) -> None:
    """Refuse a shard whose arrays are not the `names` of meta.json with their dtypes and the shapes of its
    `n` sequences of L tokens, K top ids and R negatives (the module docstring)."""
    if sorted(arrays) != sorted(names):
        raise LutqError(
            f"KD cache shard {path} holds arrays {sorted(arrays)}, meta.json says {sorted(names)}; rebuild the cache"
        )
    shapes = {
        "input_ids": (n, L),
        "topk_ids": (n, L - 1, K),
        "topk_logits": (n, L - 1, K),
        "teacher_lse": (n, L - 1),
        "neg_ids": (n, L - 1, R),
        "neg_logits": (n, L - 1, R),
    }
    for name, a in arrays.items():
        if str(a.dtype) != ARRAY_DTYPES.get(name) or tuple(a.shape) != shapes.get(name):
            raise LutqError(
                f"KD cache shard {path}: {name} is {a.dtype} of shape {tuple(a.shape)}, meta.json "
                f"implies {ARRAY_DTYPES.get(name)} of shape {shapes.get(name)}; rebuild the cache"
            )
