"""A KD cache built from an even mix of sources: shares, contiguous per-source ranges, spread text blocks,
document units across the sources, the CLI's repeatable --source and the errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError
from lutq.kd import KDCache, build_cache


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 long plain-text documents (one file each), each made of its own words."""
    root = tmp_path_factory.mktemp("texts")
    for i in range(12):
        (root / f"book{i}.txt").write_text(" ".join(f"w{i}x{j}" for j in range(400)))
    return root


@pytest.fixture(scope="module")
def mixed(kd_cfg, kd_teacher, text_dir, tmp_path_factory) -> KDCache:
    cfg = kd_cfg.replace(
        source=[kd_cfg.source, str(text_dir)],
        num_sequences=24,
        val_fraction=0.25,
        val_blocks_per_document=1,
        out=tmp_path_factory.mktemp("mix") / "cache",
    )
    return KDCache(build_cache(cfg, kd_teacher))


def _decoded(cache: KDCache, split: str, rows: range, tok) -> list[str]:
    ids = cache.read(split, np.asarray(list(rows)))["input_ids"]
    return [tok.decode(r.tolist()) for r in ids]


def test_even_shares_in_contiguous_ranges(mixed, kd_cfg, text_dir, kd_teacher):
    _, tok = kd_teacher
    meta = mixed.meta
    assert meta["source"] == [kd_cfg.source, str(text_dir)]
    assert meta["name"] == f"chat+{text_dir.name}_think_off+text_L32_K8_R4"
    assert meta["sequences"] == {"train": 18, "val": 6}
    chat, text = meta["sources"]
    assert (chat["template"], text["template"]) == ("think_off", "text")
    assert chat["ranges"] == {"train": [0, 9], "val": [0, 3]}
    assert text["ranges"] == {"train": [9, 18], "val": [3, 6]}
    book_words = re.compile(r"w\d+x\d")
    for split in ("train", "val"):
        a, b = chat["ranges"][split]
        assert not any(book_words.search(t) for t in _decoded(mixed, split, range(a, b), tok))
        a, b = text["ranges"][split]
        assert all(book_words.search(t) and "answer" not in t for t in _decoded(mixed, split, range(a, b), tok))


def test_text_blocks_are_spread_over_documents_and_held_out_ones_stay_out(mixed, text_dir, kd_teacher):
    """Each text block lies within one document, every document of the split gives blocks (spread, not the first
    pages of one), train and val take their own documents, and the val units count every document of every
    source."""
    from lutq.data import document_splits

    _, tok = kd_teacher
    text = mixed.meta["sources"][1]
    for split, docs in document_splits(str(text_dir), 0.25).items():
        a, b = text["ranges"][split]
        words = [
            {w.split("x")[0] for w in t.split() if w.startswith("w")} for t in _decoded(mixed, split, range(a, b), tok)
        ]
        assert all(len(s) == 1 for s in words)
        owners = [next(iter(s)) for s in words]
        expected = {f"w{Path(d.id).stem.removeprefix('book')}" for d in docs}
        per_document = -(-len(owners) // len(expected))  # a few blocks from each document, in a shuffled order
        assert set(owners) <= expected and max(owners.count(o) for o in owners) == per_document
        assert len(set(owners)) == -(-len(owners) // per_document) > 1
    units = mixed.document_units("val")  # here every val block has a document of its own, in both sources
    assert units.tolist() == list(range(mixed.num_sequences("val")))


def test_one_source_in_a_list_is_that_source(kd_cfg, kd_teacher, kd_cache, tmp_path):
    one = build_cache(kd_cfg.replace(source=[kd_cfg.source], out=tmp_path / "one"), kd_teacher)
    n = KDCache(kd_cache).num_sequences("train")
    assert np.array_equal(
        KDCache(one).read("train", np.arange(n))["input_ids"],
        KDCache(kd_cache).read("train", np.arange(n))["input_ids"],
    )
    assert "sources" not in json.loads((one / "meta.json").read_text())


def test_bad_mixes(kd_cfg, text_dir):
    with pytest.raises(LutqError, match="twice"):
        kd_cfg.replace(source=[kd_cfg.source, kd_cfg.source]).validate()
    with pytest.raises(LutqError, match="give the whole source"):
        kd_cfg.replace(source=[kd_cfg.source, f"{text_dir}:train"]).validate()
    with pytest.raises(LutqError, match="cannot be shared by 3 sources"):
        kd_cfg.replace(source=[kd_cfg.source, str(text_dir), "bible"], num_sequences=40, val_fraction=0.05).validate()
    with pytest.raises(LutqError, match="names no source"):
        kd_cfg.replace(source=[]).validate()


def test_cli_repeats_source(kd_dir, text_dir, tmp_path):
    """--source repeated is a mix, --source-weight its shares (3 : 1 here, so a flag that did nothing would show)."""
    out = tmp_path / "cli"
    args = ["cache", "-m", str(kd_dir / "teacher"), "-s", str(kd_dir / "chat.jsonl"), "-s", str(text_dir)]
    args += ["--source-weight", "3", "--source-weight", "1"]
    res = CliRunner().invoke(app, [*args, "-L", "32", "-K", "8", "-n", "16", "--val-fraction", "0.25", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == [str(kd_dir / "chat.jsonl"), str(text_dir)]
    assert [p["sequences"] for p in meta["sources"]] == [{"train": 9, "val": 3}, {"train": 3, "val": 1}]
    assert meta["settings"]["source_weights"] == [3, 1]


def test_kd_metrics_by_source(mixed, kd_cache, kd_dir, kd_teacher, tmp_path):
    """evaluate_kd(by_source=True) splits the metrics by the mix's sources (token-weighted, they give the whole
    split's); `lutq eval compare` shows them as a table; a one-source cache has no breakdown."""
    import copy

    import torch

    from lutq.evaluate.compare import compare
    from lutq.kd import evaluate_kd

    model, _ = kd_teacher
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = evaluate_kd(student, mixed, batch_size=4, by_source=True)
    by = out["by_source"]
    assert list(by) == mixed.meta["source"]
    assert sum(v["tokens"] for v in by.values()) == out["tokens"]
    for metric in ("kd", "kl", "top1_agree"):
        whole = sum(v[metric] * v["tokens"] for v in by.values()) / out["tokens"]
        assert whole == pytest.approx(out[metric], rel=1e-5)
    assert len({round(v["kd"], 6) for v in by.values()}) == 2 and 0 < by[mixed.meta["source"][0]]["top1_agree"] < 1
    assert "by_source" not in evaluate_kd(student, kd_cache, batch_size=4, by_source=True)

    student.save_pretrained(tmp_path / "student")
    kd_teacher[1].save_pretrained(tmp_path / "student")
    table = compare({"noisy": str(tmp_path / "student")}, cache=mixed.path).markdown()
    assert "on each source of the cache's val split" in table
    assert f"| KD chat | top-1 chat | KD {Path(mixed.meta['source'][1]).name} |" in table


def test_weighted_mix(kd_cfg, kd_teacher, text_dir, tmp_path):
    """source_weights share the splits in proportion; they are recorded per source and in the settings, and an
    even mix made without them keeps the plan it had."""
    cfg = kd_cfg.replace(
        source=[kd_cfg.source, str(text_dir)], source_weights=[3, 1], num_sequences=16, val_fraction=0.25
    )
    cache = KDCache(build_cache(cfg.replace(out=tmp_path / "w"), kd_teacher))
    assert [p["sequences"] for p in cache.meta["sources"]] == [{"train": 9, "val": 3}, {"train": 3, "val": 1}]
    assert [p["weight"] for p in cache.meta["sources"]] == [3, 1]
    assert cache.meta["settings"]["source_weights"] == [3, 1]
    even = KDCache(build_cache(dataclasses.replace(cfg, source_weights=None, out=tmp_path / "e"), kd_teacher))
    assert "source_weights" not in even.meta["settings"] and "weight" not in even.meta["sources"][0]
    with pytest.raises(LutqError, match="one positive weight per source"):
        cfg.replace(source_weights=[1]).validate()
    with pytest.raises(LutqError, match="one positive weight per source"):
        cfg.replace(source_weights=[1, 0]).validate()
    with pytest.raises(LutqError, match="cannot be shared"):
        cfg.replace(source_weights=[30, 1], num_sequences=8).validate()


def test_mix_shares():
    from lutq.data import mix_shares

    assert mix_shares(10, [1, 1, 1]) == [4, 3, 3]
    assert mix_shares(2736, [2, 1, 1, 1]) == [1095, 547, 547, 547]
    assert mix_shares(7, [0.5, 0.25, 0.25]) == [3, 2, 2]
    assert sum(mix_shares(1001, [3, 7, 11])) == 1001
    with pytest.raises(LutqError, match="non-negative"):
        mix_shares(4, [1, -1])


def test_a_capped_evaluation_covers_every_source(mixed, kd_teacher):
    """max_batches scores sequences spread over the whole split (here one batch of 4 of the 6 val sequences:
    both sources), not the first batch (which would be chat only); uncapped it scores the split in order."""
    from lutq.kd import evaluate_kd

    model, _ = kd_teacher
    capped = evaluate_kd(model, mixed, batch_size=4, max_batches=1, by_source=True)
    assert capped["sequences"] == 4 and set(capped["by_source"]) == set(mixed.meta["source"])
    whole = evaluate_kd(model, mixed, batch_size=4, max_batches=2)
    assert whole["sequences"] == 6 and whole == evaluate_kd(model, mixed, batch_size=4)
