"""The KD cache writer: equal to a direct teacher forward, resumable, multi-rank, refuses other plans."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lutq.kd.cache as cache_mod
from lutq.core import LutqError
from lutq.kd import KDCache, build_cache, finalize_cache, write_shards
from lutq.kd.cache import sample_negatives, stored_lse


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "build.json"}


def test_layout_and_meta(kd_cache, kd_teacher):
    meta = json.loads((kd_cache / "meta.json").read_text())
    shards = [f"train-0000{i}.safetensors" for i in range(4)] + ["val-00000.safetensors"]
    assert sorted(_files(kd_cache)) == ["meta.json", *shards]
    assert (meta["format"], meta["format_version"]) == ("lutq-kd-cache", 1)
    assert meta["name"] == "chat_think_off_L32_K8_R4"
    assert (meta["L"], meta["K"], meta["R"]) == (32, 8, 4)
    assert meta["sequences"] == {"train": 19, "val": 1}
    assert [s["sequences"] for s in meta["shards"]["train"]] == [6, 6, 6, 1]
    assert set(meta["arrays"]) == {"input_ids", "topk_ids", "topk_logits", "teacher_lse", "neg_ids", "neg_logits"}
    per_token = (32 * 4 + 31 * ((8 + 4) * 6 + 4)) / 32  # arrays only; headers add a little
    assert per_token < meta["bytes_per_token"] < per_token * 1.1
    assert meta["teacher_dtype"] == "float32" and meta["versions"]["torch"]
    assert not (kd_cache / "progress.json").exists()
    assert json.loads((kd_cache / "build.json").read_text())["runs"][0]["rank0"]["tokens"] == 20 * 32


def test_cache_equals_direct_teacher_forward(kd_cache, kd_teacher):
    model, tok = kd_teacher
    cache = KDCache(kd_cache)
    for split in ("train", "val"):
        b = cache.read(split, np.arange(cache.num_sequences(split)))
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        vals, ids = logits.topk(8, dim=-1)
        assert torch.equal(b["topk_ids"], ids)
        torch.testing.assert_close(b["topk_logits"], vals.half().float(), rtol=2**-10, atol=1e-4)
        assert (b["topk_logits"][..., :-1] >= b["topk_logits"][..., 1:]).all()
        # the full vocabulary's log-sum-exp, with the top-K at their stored fp16 values: a proper distribution
        torch.testing.assert_close(b["teacher_lse"], logits.logsumexp(-1), rtol=0, atol=2e-3)
        head = (b["topk_logits"] - b["teacher_lse"][..., None]).exp().sum(-1)
        tail = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - b["teacher_lse"]
        torch.testing.assert_close(head + tail.exp(), torch.ones_like(head), rtol=0, atol=1e-5)
        # negatives: inside the tokenizer's vocabulary, never a top-K id, with the teacher's logits
        neg = b["neg_ids"]
        assert neg.min() >= 0 and neg.max() < len(tok)
        assert not (neg[..., :, None] == b["topk_ids"][..., None, :]).any()
        ref = logits.gather(-1, neg).half().float()
        torch.testing.assert_close(b["neg_logits"], ref, rtol=2**-10, atol=1e-4)


def test_blocks_are_packed_renderings_with_eos(kd_cache, kd_teacher):
    _, tok = kd_teacher
    ids = KDCache(kd_cache).read("train", np.arange(19))["input_ids"]
    text = tok.decode(ids.flatten().tolist())
    assert "<think>" not in text and "answer" in text  # thinking 'off' stripped the think blocks
    # each rendering ends with the template's <|im_end|>, then packing adds EOS (also <|im_end|> here)
    docs = text.split("<|im_end|><|im_end|>")
    assert len(docs) > 3
    assert all(d.startswith("<|im_start|>user\nquestion ") for d in docs[1:-1])


def test_document_units_follow_the_renderings(kd_cache, kd_teacher):
    """meta.json's document_starts: a sequence starts a new unit exactly when its first token lies in another
    rendering than the previous sequence's first token (the chat renderings are found by their EOS pair)."""
    _, tok = kd_teacher
    cache = KDCache(kd_cache)
    for split in ("train", "val"):
        n = cache.num_sequences(split)
        ids = cache.read(split, np.arange(n))["input_ids"].flatten().tolist()
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        doc, owner = 0, []
        for i, t in enumerate(ids):  # a rendering's own <|im_end|>, then packing's EOS: the next one begins after
            owner.append(doc)
            if t == eos and i and ids[i - 1] == eos:
                doc += 1
        L = cache.L
        first = [owner[j * L] for j in range(n)]
        expected = [j for j in range(n) if j == 0 or first[j] != first[j - 1]]
        assert cache.meta["document_starts"][split] == expected, split
        units = cache.document_units(split)
        assert len(set(units.tolist())) == len(expected) and units[0] == 0
    assert len(cache.meta["document_starts"]["train"]) < cache.num_sequences("train")  # documents span sequences


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_lse_for_fp32_and_bf16_teachers(dtype):
    logits = (torch.randn(3, 5, 300, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    before = logits.clone()
    vals, ids = logits.topk(8, dim=-1)
    stored = vals.half()
    lse = stored_lse(logits, vals, stored)
    assert torch.equal(logits, before)  # the teacher's logits are left as they were
    exact = logits.float().scatter(-1, ids, stored.float()).logsumexp(-1)  # top-K at their stored values
    torch.testing.assert_close(lse, exact, rtol=0, atol=1e-5)


def test_sample_negatives_is_uniform_over_the_complement():
    topk = torch.tensor([[3, 0, 7]])
    u = (torch.arange(7, dtype=torch.float64) / 7 + 1e-9)[None]  # every allowed slot once
    assert sample_negatives(topk, u, vocab=10).tolist() == [[1, 2, 4, 5, 6, 8, 9]]
    # ids at or past the limit exclude nothing
    assert sample_negatives(
        torch.tensor([[12, 1]]), u[:, :4] * 0 + torch.tensor([[0.0, 0.3, 0.6, 0.99]]), vocab=5
    ).tolist() == [[0, 2, 3, 4]]


def test_resume_after_kill_is_byte_identical(kd_cfg, kd_teacher, kd_cache, tmp_path, monkeypatch):
    cfg = kd_cfg.replace(out=tmp_path / "c")
    real_write, calls = cache_mod.write_shard, []

    def dying_write(path, arrays):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(path.name)
        return real_write(path, arrays)

    monkeypatch.setattr(cache_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, kd_teacher)
    written = sorted(p.name for p in cfg.out.glob("*.safetensors"))
    assert written == ["train-00000.safetensors", "train-00001.safetensors"]
    assert (cfg.out / "progress.json").exists() and not (cfg.out / "meta.json").exists()
    assert not list(cfg.out.glob(".*tmp"))  # no half-written shard left behind
    with pytest.raises(LutqError, match="unfinished"):
        KDCache(cfg.out)
    monkeypatch.setattr(cache_mod, "write_shard", real_write)
    build_cache(cfg, kd_teacher)
    runs = json.loads((cfg.out / "build.json").read_text())["runs"]
    assert runs[-1]["rank0"]["sequences"] == 20 - 12  # only the missing shards were computed
    assert _files(cfg.out) == _files(kd_cache)


def test_val_split_spread_over_documents(kd_cfg, kd_teacher, kd_cache, tmp_path):
    """val_blocks_per_document=1: every val sequence comes from its own document (one unit each); the train split
    is packed as before, and a cache made without the setting keeps its plan hash (the key is left out)."""
    cfg = kd_cfg.replace(out=tmp_path / "s", val_blocks_per_document=1, num_sequences=40, val_fraction=0.2)
    cache = KDCache(build_cache(cfg, kd_teacher))
    units = cache.document_units("val")
    assert len(units) == cache.num_sequences("val") >= 2 and len(set(units.tolist())) == len(units)
    packed = KDCache(build_cache(cfg.replace(out=tmp_path / "p", val_blocks_per_document=0), kd_teacher))
    assert len(set(packed.document_units("val").tolist())) < packed.num_sequences("val")
    n = cache.num_sequences("train")
    assert torch.equal(cache.read("train", np.arange(n))["input_ids"], packed.read("train", np.arange(n))["input_ids"])
    assert cache.meta["settings"]["val_blocks_per_document"] == 1
    assert "val_blocks_per_document" not in packed.meta["settings"]
    assert "val_blocks_per_document" not in KDCache(kd_cache).meta["settings"]
    with pytest.raises(LutqError, match="val_blocks_per_document"):
        kd_cfg.replace(val_blocks_per_document=-1).validate()


def test_rerun_records_the_documents_of_an_older_cache(kd_cfg, kd_teacher, kd_cache, tmp_path):
    """A complete cache from before document_starts: `lutq cache` with the same settings adds them to meta.json
    (nothing else changes, no shard is rewritten)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(kd_cache, old)
    meta = json.loads((old / "meta.json").read_text())
    starts = meta.pop("document_starts")
    (old / "meta.json").write_text(json.dumps(meta))
    assert KDCache(old).document_units("val") is None
    shards = {p.name: p.stat().st_mtime_ns for p in old.glob("*.safetensors")}
    build_cache(kd_cfg.replace(out=old), kd_teacher)
    upgraded = json.loads((old / "meta.json").read_text())
    assert upgraded == {**meta, "document_starts": starts}
    assert {p.name: p.stat().st_mtime_ns for p in old.glob("*.safetensors")} == shards
    assert KDCache(old).document_units("val") is not None


def test_other_settings_are_refused_then_overwritten(kd_cfg, kd_teacher, tmp_path):
    cfg = kd_cfg.replace(out=tmp_path / "c", num_sequences=8)
    build_cache(cfg, kd_teacher)
    with pytest.raises(LutqError, match="other settings"):
        build_cache(cfg.replace(seed=1), kd_teacher)
    build_cache(cfg.replace(seed=1, overwrite=True), kd_teacher)
    assert json.loads((cfg.out / "meta.json").read_text())["seed"] == 1
    before = (cfg.out / "meta.json").read_bytes()
    build_cache(cfg.replace(seed=1), kd_teacher)  # complete already: nothing to do
    assert (cfg.out / "meta.json").read_bytes() == before


def test_two_ranks_read_like_one_process(kd_cfg, kd_teacher, kd_cache, tmp_path):
    cfg = kd_cfg.replace(out=tmp_path / "c")
    out, _ = write_shards(cfg, kd_teacher, rank=0, world_size=2)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "train-00000.safetensors",
        "train-00002.safetensors",
        "val-00000.safetensors",
    ]
    with pytest.raises(LutqError, match="not written yet"):
        finalize_cache(out)
    write_shards(cfg, kd_teacher, rank=1, world_size=2)
    finalize_cache(out)
    assert _files(out) == _files(kd_cache)


def test_bad_configs(kd_cfg, kd_teacher, tmp_path):
    with pytest.raises(LutqError, match="thinking='sometimes'"):
        build_cache(kd_cfg.replace(thinking="sometimes", out=tmp_path / "a"), kd_teacher)
    with pytest.raises(LutqError, match="give the whole source"):
        build_cache(kd_cfg.replace(source=kd_cfg.source + ":train", out=tmp_path / "b"), kd_teacher)
    with pytest.raises(LutqError, match="do not fit"):
        build_cache(kd_cfg.replace(top_k=1000, out=tmp_path / "c"), kd_teacher)


def test_max_tokens_plain_text_and_no_val(kd_cfg, kd_teacher, tmp_path, monkeypatch):
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"document {i} " * 30)
    cfg = dataclasses.replace(
        kd_cfg, source=str(tmp_path / "txt"), max_tokens=32 * 7, val_fraction=0.0, negatives=0, out=None
    )
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path / "home"))
    out = build_cache(cfg, kd_teacher)
    assert out == tmp_path / "home" / "caches" / "txt_text_L32_K8_R0"
    cache = KDCache(out)
    assert (cache.num_sequences("train"), cache.num_sequences("val")) == (7, 0)
    assert "neg_ids" not in cache.read("train", [0])
