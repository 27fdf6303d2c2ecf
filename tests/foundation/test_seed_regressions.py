"""Regressions for bugs of the seed QAT toolkit (/work/shared/reference/seed-qat-toolkit.md) that lutq fixed but no
other test pinned down: scales clamped positive, Q4→Q2 k-means of the bare LUT values, SVDs thrown away by the
conversion, evaluation on training sequences, and STE-FP16 silently undone by bf16 autocast."""

from __future__ import annotations

import contextlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lutq.kd import KDCache, evaluate_kd
from lutq.models import load_model, save_checkpoint
from lutq.quant import LUTLinear, convert_q4_to_q2, get_preset, lut_layers, quantize
from lutq.quant.convert import convert_checkpoint, convert_layer, usage_weights
from lutq.quant.init import repick_indices_
from lutq.quant.lut import kmeans_lut
from lutq.quant.snap import snap_layer_
from lutq.testing import WORDS, sharp_tiny_teacher, tiny_cache, tiny_model, tiny_tokenizer
from lutq.train import train
from lutq.train.config import TrainConfig
from lutq.train.trainer import build_student, evaluate_student, ste_fp16_precision_note

# --- seed §1 / §11.9: S = clamp(A·B, min=1e-8) "silently zeroes weights where A·B <= 0" ----------------------------


def test_negative_scales_are_used_not_clamped_away() -> None:
    g = torch.Generator().manual_seed(0)
    layer = LUTLinear(24, 16, 16, 3)
    with torch.no_grad():
        layer.scale_A.copy_(torch.randn(16, 3, generator=g))
        layer.scale_B.copy_(torch.randn(3, 24, generator=g))
        layer.scale_g.copy_(torch.tensor([1.0, 0.8, 0.6]))
    s = layer.scale_map().detach()
    edge = 0.05 * float(s.abs().max())
    neg = s < -edge
    assert neg.float().mean() > 0.2 and (s > edge).float().mean() > 0.2
    # a weight that is exactly lut[idx] ⊙ S for some idx, negative S included: the nearest pick recovers it
    true_idx = torch.randint(0, 16, s.shape, generator=g)
    w = layer.lut[true_idx] * s
    repick_indices_(layer, w)
    assert torch.equal(layer.idx.long(), true_idx)
    weff = layer.effective_weight().detach()
    torch.testing.assert_close(weff, w)
    assert bool((weff[neg].abs() > 1e-5).all())  # the seed's clamp made these lut[idx]·1e-8
    y = layer(torch.ones(1, 24))
    torch.testing.assert_close(y, w.sum(1)[None], rtol=1e-5, atol=1e-5)
    # the FP16 snap keeps the negative scales too (only FP16 rounding)
    snap_layer_(layer)
    torch.testing.assert_close(layer.effective_weight().detach(), w, rtol=0, atol=2e-2 * float(w.abs().max()))


# --- seed §3 / §11.10: Q4→Q2 "clusters the 16 LUT values themselves, unweighted" and "runs 196 discarded SVDs" ---


def test_q4_to_q2_lut_is_the_usage_weighted_kmeans_of_the_entries() -> None:
    model = tiny_model("llama")
    quantize(model, "q4a4", progress=False)
    layer = model.model.layers[0].mlp.up_proj
    weighted = kmeans_lut(layer.lut, usage_weights(layer), 4)
    unweighted = kmeans_lut(layer.lut, None, 4)  # what the seed did (up to its init)
    new, _, _ = convert_layer(layer, 4, 32)
    assert torch.equal(new.lut, weighted) and not torch.equal(new.lut, unweighted)
    # and it fits the q4 weights better than the plain k-means of the 16 values would
    target = layer.effective_weight().detach()
    plain = LUTLinear(layer.in_features, layer.out_features, 4, 32, lut=unweighted)
    with torch.no_grad():
        for name in ("scale_A", "scale_B", "scale_g"):
            getattr(plain, name).copy_(getattr(new, name))
    repick_indices_(plain, target)
    err = {k: float((m.effective_weight().detach() - target).norm()) for k, m in (("w", new), ("u", plain))}
    assert err["w"] < err["u"]


def test_q4_to_q2_conversion_runs_no_svd(tmp_path: Path, monkeypatch) -> None:
    on_disk, in_memory = tiny_model("qwen3"), tiny_model("llama")
    for model in (on_disk, in_memory):
        quantize(model, "q4a4", progress=False)  # the init's SVDs happen here, before the patch
    save_checkpoint(tmp_path / "q4", on_disk, tiny_tokenizer())

    def no_svd(*args, **kwargs):
        raise AssertionError("the q4→q2 conversion computed an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    report = convert_checkpoint(tmp_path / "q4", tmp_path / "q2", show=False)  # load + convert + save
    assert len(report.rows) == 14
    assert len(convert_q4_to_q2(in_memory).rows) == 14


# --- seed §4.3 / §11.6: eval "over the first 40 sequences ... part of the training data, not held out" ---------


@pytest.fixture(scope="module")
def marked_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher dir, KD cache) from 80 documents that each carry a marker `docNNNx`."""
    root = tmp_path_factory.mktemp("seed_kd")
    model, tok = sharp_tiny_teacher(), tiny_tokenizer()
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    rng = random.Random(0)
    with (root / "docs.jsonl").open("w") as f:
        for i in range(80):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            f.write(json.dumps({"text": f"doc{i:03d}x {words}"}) + "\n")
    cache = tiny_cache(root, teacher=(model, tok), num_sequences=80, val_fraction=0.15, batch_size=32)
    return root / "teacher", cache


def _markers(cache: KDCache, split: str, tok) -> set[str]:
    ids = cache.read(split, np.arange(cache.num_sequences(split)))["input_ids"]
    return set(re.findall(r"doc(\d{3})x", tok.decode(ids.flatten().tolist())))


def test_training_evaluates_held_out_documents(marked_cache, tmp_path: Path) -> None:
    teacher, cache_dir = marked_cache
    cache = KDCache(cache_dir)
    tok = tiny_tokenizer()
    train_docs, val_docs = _markers(cache, "train", tok), _markers(cache, "val", tok)
    assert len(val_docs) >= 3 and len(train_docs) > 20 and not train_docs & val_docs  # whole documents held out
    cfg = TrainConfig(
        cache=cache_dir,
        out=tmp_path / "run",
        model=str(teacher),
        preset="q4a4",
        init_lut="uniform",
        init_tighten=0,
        init_calib_sequences=0,
        batch_size=2,
        eval_batches=3,
        device="cpu",
    )
    model, tokenizer = build_student(cfg, cache, verbose=False)
    got = evaluate_student(model, cache, cfg, contextlib.nullcontext, {}, tokenizer)
    val = evaluate_kd(model, cache, "val", batch_size=2, max_batches=3, cfg=cfg.kd)
    trn = evaluate_kd(model, cache, "train", batch_size=2, max_batches=3, cfg=cfg.kd)
    assert got["eval_loss"] == pytest.approx(val["loss"]) and got["eval_tokens"] == val["tokens"]
    assert got["eval_loss"] != pytest.approx(trn["loss"])


# --- seed §2 / §11.8: "STE-FP16 runs under default bf16 autocast" (the emulated FP16 rounding is lost) ----------


def test_ste_fp16_under_bf16_autocast_is_flagged(marked_cache, tmp_path: Path, capsys) -> None:
    teacher, cache_dir = marked_cache
    model, tok = load_model(teacher)
    quantize(model, get_preset("q4a4").replace(ste_fp16=True), progress=False)
    assert all(layer.ste_fp16 for _, layer in lut_layers(model))
    note = ste_fp16_precision_note(model, "bf16")
    assert note is not None and "14 LUT layers" in note and "--precision fp32" in note
    assert ste_fp16_precision_note(model, "fp32") is None
    plain = tiny_model("llama")
    quantize(plain, "q4a4", progress=False)
    assert ste_fp16_precision_note(plain, "bf16") is None
    # the trainer prints it for such a student under bf16 autocast, and not under fp32
    save_checkpoint(tmp_path / "ste", model, tok)
    base = TrainConfig(
        cache=cache_dir, init=tmp_path / "ste", steps=1, batch_size=2, eval_batches=0, device="cpu", warmup=0
    )
    capsys.readouterr()
    train(base.replace(out=tmp_path / "bf16", precision="bf16"))
    assert "emulate FP16 (ste_fp16)" in " ".join(capsys.readouterr().err.split())
    train(base.replace(out=tmp_path / "fp32", precision="fp32"))
    assert "emulate FP16" not in " ".join(capsys.readouterr().err.split())
