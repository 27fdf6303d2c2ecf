"""The KD cache reader: deterministic batches, ranks, workers, integrity errors, tokenizer check."""

from __future__ import annotations

import json
import pickle
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from lutq.core import LutqError
from lutq.kd import KDCache
from lutq.testing import tiny_tokenizer


def _ids(batch):
    return [tuple(r) for r in batch["input_ids"].tolist()]


def test_batches_types_and_shapes(kd_cache):
    cache = KDCache(kd_cache)
    b = next(cache.batches("train", 4, seed=0))
    assert b["input_ids"].shape == (4, 32) and b["input_ids"].dtype == torch.long
    assert b["topk_ids"].shape == (4, 31, 8) and b["topk_ids"].dtype == torch.long
    assert b["topk_logits"].dtype == torch.float32 and b["neg_logits"].shape == (4, 31, 4)
    assert cache.num_sequences("train") == 19 and cache.num_sequences("val") == 1
    with pytest.raises(LutqError, match="split 'test'"):
        cache.num_sequences("test")


def test_batches_are_deterministic_and_resumable(kd_cache):
    cache = KDCache(kd_cache)
    full = [_ids(b) for b in islice(cache.batches("train", 4, seed=3), 10)]  # 4 steps per epoch, drop 3
    assert [_ids(b) for b in islice(cache.batches("train", 4, seed=3, start_step=6), 4)] == full[6:]
    epoch0 = [r for b in full[:4] for r in b]
    assert len(set(epoch0)) == 16 and epoch0 != [r for b in full[4:8] for r in b]  # new order each epoch
    assert [_ids(b) for b in islice(cache.batches("train", 4, seed=4), 4)] != full[:4]
    ordered = list(cache.batches("train", 4, shuffle=False))  # one pass, short last batch kept
    assert [len(b["input_ids"]) for b in ordered] == [4, 4, 4, 4, 3]
    everything = cache.read("train", np.arange(19))
    assert torch.equal(torch.cat([b["input_ids"] for b in ordered]), everything["input_ids"])
    assert len(list(cache.batches("train", 4, seed=0, epochs=2))) == 8


def test_ranks_split_each_global_batch(kd_cache):
    cache = KDCache(kd_cache)
    single = [_ids(b) for b in islice(cache.batches("train", 4, seed=1), 4)]
    r0 = [_ids(b) for b in islice(cache.batches("train", 2, seed=1, rank=0, world_size=2), 4)]
    r1 = [_ids(b) for b in islice(cache.batches("train", 2, seed=1, rank=1, world_size=2), 4)]
    assert [a + b for a, b in zip(r0, r1, strict=True)] == single


def test_dataloader_workers_and_pickle(kd_cache):
    cache = KDCache(kd_cache)
    cache.read("train", [0])  # opens memmaps in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.read("train", [5, 17])["topk_ids"], cache.read("train", [5, 17])["topk_ids"])
    loader = torch.utils.data.DataLoader(
        cache.dataset("train"), batch_size=5, num_workers=2, multiprocessing_context="fork"
    )
    got = torch.cat([b["topk_logits"] for b in loader])
    assert torch.equal(got, cache.read("train", np.arange(19))["topk_logits"])


def test_corrupt_shard_is_named(kd_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(kd_cache, bad)
    shard = bad / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = KDCache(bad)
    cache.read("train", [0])  # shard 0 is fine: checked lazily, per shard
    with pytest.raises(LutqError, match=r"train-00001\.safetensors is corrupt"):
        cache.read("train", [7])
    with pytest.raises(LutqError, match=r"train-00001\.safetensors is corrupt"):
        KDCache(bad).verify_checksums()


def test_truncated_or_missing_shard_is_named(kd_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(kd_cache, bad)
    shard = bad / "val-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(LutqError, match=r"val-00000\.safetensors has \d+ bytes.*truncated"):
        KDCache(bad)
    shard.unlink()
    with pytest.raises(LutqError, match=r"val-00000\.safetensors is missing"):
        KDCache(bad)


def test_not_a_cache(tmp_path):
    with pytest.raises(LutqError, match="not a KD cache"):
        KDCache(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LutqError, match="expected .lutq-kd-cache."):
        KDCache(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "lutq-kd-cache", "format_version": 1, "L": 8}))
    with pytest.raises(LutqError, match="malformed"):
        KDCache(tmp_path)


def test_tokenizer_mismatch_refused(kd_cache, kd_teacher):
    cache = KDCache(kd_cache)
    cache.check_tokenizer(kd_teacher[1])
    other = tiny_tokenizer()
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    want = cache.meta["tokenizer"]["fingerprint"][:16]
    with pytest.raises(LutqError, match=f"tokenizer mismatch: .*{want}.*the student's is [0-9a-f]{{16}}"):
        cache.check_tokenizer(other)
