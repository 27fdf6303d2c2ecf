"""Reading a KD cache: memory-mapped shards, deterministic shuffled batches, train/val splits.

Integrity: at open, every shard's size is checked against meta.json (a truncated file fails at once);
the sha256 of a shard is checked lazily, the first time a process touches it, so opening a large cache
is instant and a corrupt shard still fails with its name before any of its bytes are used.
`verify_checksums()` checks them all up front.

Memmaps are opened lazily per process and dropped when pickled, so a `KDCache` (and `dataset(split)`)
is safe to hand to DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lutq.core import LutqError, sha256_file
from lutq.core.formats import read_versioned_json
from lutq.kd.shards import FORMAT, FORMAT_VERSION, META, PROGRESS, check_shard, open_shard

SPLITS = ("train", "val")


class KDCache:
    """A finished KD cache directory (see `lutq.kd.cache`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        hint = " (unfinished: re-run `lutq cache` to resume)" if (self.path / PROGRESS).is_file() else ""
        self.meta: dict[str, Any] = read_versioned_json(
            meta_path, format=FORMAT, max_version=FORMAT_VERSION, what="KD cache", missing_hint=hint
        )
        try:
            self.L, self.K, self.R = int(self.meta["L"]), int(self.meta["K"]), int(self.meta["R"])
            self._shards = {s: [_shard_entry(sh) for sh in self.meta["shards"].get(s, [])] for s in SPLITS}
            self._arrays = list(self.meta["arrays"])
            self._fingerprint = str(self.meta["tokenizer"]["fingerprint"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LutqError(f"{meta_path}: incomplete or malformed ({e!r})") from e
        self._starts = {s: np.cumsum([0] + [sh["sequences"] for sh in self._shards[s]]) for s in SPLITS}
        for split in SPLITS:
            for sh in self._shards[split]:
                f = self.path / sh["file"]
                if not f.is_file():
                    raise LutqError(f"KD cache shard {f} is missing")
                if f.stat().st_size != sh["bytes"]:
                    raise LutqError(
                        f"KD cache shard {f} has {f.stat().st_size} bytes, meta.json says "
                        f"{sh['bytes']} (truncated or replaced); rebuild the cache"
                    )
        self._pid = -1
        self._open: dict[str, dict[str, np.memmap]] = {}

    # --- identity ---------------------------------------------------------------------------------

    def num_sequences(self, split: str) -> int:
        """Number of L-token sequences in `split` ('train' or 'val')."""
        return int(self._starts[_check_split(split)][-1])

    def check_tokenizer(self, tokenizer: Any, model: Any = None) -> None:
        """Refuse a student tokenizer whose fingerprint differs from the teacher's (or a missing one) and,
        given the student `model`, a vocabulary smaller than the teacher's (the cached ids index it)."""
        from lutq.data import tokenizer_fingerprint

        name = self.meta["tokenizer"].get("name_or_path")
        if tokenizer is None:
            raise LutqError(
                f"the student has no tokenizer (a checkpoint saved without tokenizer files?); cache "
                f"{self.path} needs the teacher's ({name})"
            )
        want, got = self._fingerprint, tokenizer_fingerprint(tokenizer)
        if want != got:
            raise LutqError(
                f"tokenizer mismatch: cache {self.path} was built with tokenizer {want[:16]}… "
                f"({name}), the student's is {got[:16]}…"
            )
        teacher_vocab = self.meta.get("teacher_vocab_size")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and teacher_vocab is not None and int(vocab) < int(teacher_vocab):
            raise LutqError(
                f"the student has a vocabulary of {vocab}, smaller than the teacher's {teacher_vocab} "
                f"that the ids in cache {self.path} index; use a student of the teacher's vocabulary"
            )

    def document_units(self, split: str) -> np.ndarray | None:
        """For each sequence of `split`, the index of the document its first token belongs to (documents counted
        from 0 in the split's order): the units a KD evaluation's intervals are taken over, since the sequences of
        one conversation are not independent draws. None for a cache written before they were recorded."""
        starts = self.meta.get("document_starts", {}).get(_check_split(split))
        if starts is None:
            return None
        marks = np.zeros(self.num_sequences(split), dtype=np.int64)
        marks[[s for s in starts if 0 < s < len(marks)]] = 1
        return np.cumsum(marks)

    def source_ranges(self, split: str) -> dict[str, tuple[int, int]] | None:
        """For a cache built from a mix of sources, each source's [start, stop) sequences of `split`; None for a
        cache of one source."""
        parts = self.meta.get("sources")
        if not parts:
            return None
        return {p["source"]: tuple(p["ranges"][_check_split(split)]) for p in parts}

    @property
    def has_negatives(self) -> bool:
        return self.R > 0

    @property
    def has_teacher_lse(self) -> bool:
        """Whether the shards hold the teacher's full-vocabulary log-sum-exp (caches built since it was added)."""
        return "teacher_lse" in self.meta.get("arrays", {})

    def __repr__(self) -> str:
        return (
            f"KDCache({str(self.path)!r}, L={self.L}, K={self.K}, R={self.R}, "
            f"train={self.num_sequences('train')}, val={self.num_sequences('val')})"
        )

    # --- reading ----------------------------------------------------------------------------------

    def _shard(self, split: str, i: int) -> dict[str, np.memmap]:
        if self._pid != os.getpid():  # first use in this process (e.g. a DataLoader worker)
            self._pid, self._open = os.getpid(), {}
        sh = self._shards[split][i]
        if sh["file"] not in self._open:
            f = self.path / sh["file"]
            if sha256_file(f) != sh["sha256"]:
                raise LutqError(f"KD cache shard {f} is corrupt (sha256 differs from meta.json); rebuild it")
            arrays = open_shard(f)
            check_shard(f, arrays, self._arrays, sh["sequences"], self.L, self.K, self.R)
            self._open[sh["file"]] = arrays
        return self._open[sh["file"]]

    def verify_checksums(self) -> None:
        """Hash every shard now (instead of lazily on first touch)."""
        for split in SPLITS:
            for i in range(len(self._shards[split])):
                self._shard(split, i)

    def read(self, split: str, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The sequences `indices` of `split` as a batch: input_ids [B, L] long, topk_ids [B, L-1, K] long,
        topk_logits [B, L-1, K] float32, teacher_lse [B, L-1] float32 and, when cached, neg_ids / neg_logits
        [B, L-1, R]."""
        idx = np.asarray(indices, dtype=np.int64)
        n = self.num_sequences(split)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{split} has {n} sequences; asked for {idx.min()}..{idx.max()}")
        shard_of = np.searchsorted(self._starts[split], idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            arrays = self._shard(split, int(s))
            local = idx[rows] - self._starts[split][s]
            for name, a in arrays.items():
                if name not in out:
                    out[name] = np.empty((len(idx), *a.shape[1:]), dtype=a.dtype)
                out[name][rows] = a[local]
        return {
            name: torch.from_numpy(a).long() if a.dtype == np.int32 else torch.from_numpy(a).float()
            for name, a in out.items()
        }

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `batch_size` sequences per rank (a step consumes batch_size * world_size sequences).

        Epoch e visits the sequences in `permutation(seed, e)` (in order when not shuffling), so step s
        is the same batch whatever `start_step` a run resumed from. With shuffle, a short last batch is
        dropped and the stream is endless unless `epochs` is given; without shuffle it is one pass
        (`epochs` defaults to 1) that keeps the short last batch.
        """
        n = self.num_sequences(split)
        if not 0 <= rank < world_size:
            raise LutqError(f"rank {rank} not in [0, {world_size})")
        global_batch = batch_size * world_size
        if epochs is None:
            epochs = None if shuffle else 1
        per_epoch = n // global_batch if shuffle else -(-n // global_batch)
        if n == 0 or per_epoch == 0:
            raise LutqError(f"{self.path}: {split} has {n} sequences, fewer than one batch of {global_batch}")
        step = start_step
        while epochs is None or step < epochs * per_epoch:
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
            chunk = order[k * global_batch : (k + 1) * global_batch]
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
            step += 1
            if len(mine):
                yield self.read(split, mine)

    def dataset(self, split: str) -> KDSplitDataset:
        """A map-style torch Dataset of single sequences (for a DataLoader with workers)."""
        return KDSplitDataset(self, _check_split(split))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"], state["_open"] = -1, {}
        return state


class KDSplitDataset(torch.utils.data.Dataset):
    """One split of a KDCache; item i is a dict of tensors without the batch dimension."""

    def __init__(self, cache: KDCache, split: str) -> None:
        self.cache, self.split = cache, split

    def __len__(self) -> int:
        return self.cache.num_sequences(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.cache.read(self.split, [i]).items()}


def _shard_entry(sh: dict[str, Any]) -> dict[str, Any]:
    """One shard's record in meta.json, with every field the reader uses (KeyError / ValueError if not)."""
    return {
        "file": str(sh["file"]),
        "sequences": int(sh["sequences"]),
        "bytes": int(sh["bytes"]),
        "sha256": str(sh["sha256"]),
    }


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise LutqError(f"split {split!r}: choose 'train' or 'val'")
    return split
