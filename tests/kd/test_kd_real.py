"""The real SmolLM2 teacher on ShareGPT chat: a small cache builds, verifies, refuses other tokenizers."""

from __future__ import annotations

import pytest

from lutq.core import LutqError
from lutq.kd import CacheConfig, KDCache, build_cache, verify_cache
from lutq.testing import require_asset, tiny_tokenizer


@pytest.mark.slow
def test_real_teacher_sharegpt_cache(teacher, tmp_path):
    require_asset("sharegpt")
    cfg = CacheConfig(
        model="smollm2-135m-instruct",
        source="sharegpt",
        thinking="off",
        seq_len=32,
        top_k=16,
        negatives=2,
        num_sequences=2,
        val_fraction=0.0,
        batch_size=4,
        out=tmp_path / "c",
    )
    out = build_cache(cfg, teacher)
    cache = KDCache(out)
    assert cache.meta["name"] == "sharegpt_think_off_L32_K16_R2"
    assert cache.meta["teacher_vocab_size"] == 49152
    assert (cache.num_sequences("train"), cache.num_sequences("val")) == (2, 0)  # one teacher forward
    _, tok = teacher
    text = tok.decode(cache.read("train", [0, 1])["input_ids"].flatten().tolist())
    assert "<|im_start|>" in text  # rendered through SmolLM2's chat template
    cache.check_tokenizer(tok)
    with pytest.raises(LutqError, match="tokenizer mismatch"):
        cache.check_tokenizer(tiny_tokenizer())
    report = verify_cache(out, n=1, teacher=teacher)  # one more forward
    assert report["ok"] and report["positions"] == 31, report
