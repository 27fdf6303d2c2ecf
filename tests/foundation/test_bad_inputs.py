"""Bad inputs to the artefact readers and commands: a clear LutqError naming what and where (never a raw
traceback, never silently wrong), and an existing artefact is never destroyed by a failing command."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError, sha256_file
from lutq.testing import TINY_PRETRAIN, tiny_cache_config, tiny_model, tiny_tokenizer, write_teacher_and_docs


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny teacher, a KD cache of it (3 train shards + 1 val), and a q2a4 LUT checkpoint of it."""
    from lutq.kd import build_cache
    from lutq.models import save_checkpoint
    from lutq.quant import quantize

    root = tmp_path_factory.mktemp("bad")
    model, tok = write_teacher_and_docs(root, num_docs=30)
    cfg = tiny_cache_config(root, seq_len=16, top_k=4, num_sequences=16, val_fraction=0.25, batch_size=4, shard_size=4)
    build_cache(cfg, teacher=(model, tok))
    student = copy.deepcopy(model)
    quantize(student, "q2a4", progress=False)
    save_checkpoint(root / "q2", student, tok)
    return SimpleNamespace(root=root, cfg=cfg, cache=root / "cache", ckpt=root / "q2", teacher=(model, tok))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


# --- KD cache -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m.pop("tokenizer"), "tokenizer"),
        (lambda m: m["tokenizer"].pop("fingerprint"), "fingerprint"),
        (lambda m: m.pop("arrays"), "arrays"),
        (lambda m: m["shards"]["train"][0].pop("sequences"), "sequences"),
        (lambda m: m["shards"]["train"][0].pop("sha256"), "sha256"),
    ],
)
def test_cache_meta_missing_key_is_named(fx, tmp_path, edit, what) -> None:
    from lutq.kd import KDCache

    bad = _copy(fx.cache, tmp_path / "cache")
    _edit_json(bad / "meta.json", edit)
    with pytest.raises(LutqError, match=rf"meta\.json: .*{what}"):
        KDCache(bad).check_tokenizer(fx.teacher[1])


def _rewrite_shard(cache: Path, edit: Any, name: str = "train-00001.safetensors") -> None:
    """Rewrite a shard's arrays and make meta.json agree with the new file (size, sha256)."""
    shard = cache / name
    arrays = np_load_file(str(shard))
    edit(arrays)
    np_save_file(arrays, str(shard))

    def fix(meta: dict[str, Any]) -> None:
        for entry in meta["shards"]["train"]:
            if entry["file"] == name:
                entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)

    _edit_json(cache / "meta.json", fix)


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda a: a.update(topk_logits=a["topk_logits"].astype(np.float32)), "topk_logits.*float32"),
        (
            lambda a: a.update(topk_ids=a["topk_ids"][..., :2].copy(), topk_logits=a["topk_logits"][..., :2].copy()),
            "topk_ids.*shape",
        ),
        (lambda a: a.update({k: v[:, :-1].copy() for k, v in a.items()}), "shape"),
        (lambda a: a.update({k: v[:-1].copy() for k, v in a.items()}), "shape"),
        (lambda a: a.pop("topk_logits"), "topk_logits"),
    ],
)
def test_cache_shard_with_wrong_contents_is_named(fx, tmp_path, edit, what) -> None:
    """A shard whose checksum matches meta.json but whose arrays are not what meta.json describes."""
    from lutq.kd import KDCache
    from lutq.kd.verify import verify_cache

    bad = _copy(fx.cache, tmp_path / "cache")
    _rewrite_shard(bad, edit)
    cache = KDCache(bad)
    cache.read("train", [0])  # shard 0 is fine
    with pytest.raises(LutqError, match=rf"train-00001\.safetensors.*{what}"):
        cache.read("train", np.arange(cache.num_sequences("train")))
    with pytest.raises(LutqError, match=r"train-00001\.safetensors"):
        verify_cache(bad, teacher=fx.teacher)


@pytest.mark.parametrize("key", ["settings", "teacher_dtype"])
def test_cache_verify_names_a_missing_meta_key(fx, tmp_path, key) -> None:
    from lutq.kd.verify import verify_cache

    bad = _copy(fx.cache, tmp_path / "cache")
    _edit_json(bad / "meta.json", lambda m: m.pop(key))
    with pytest.raises(LutqError, match=rf"meta\.json: .*{key}"):
        verify_cache(bad, teacher=fx.teacher)


@pytest.mark.parametrize("name", ["meta.json", "build.json", "progress.json"])
def test_cache_rebuild_over_corrupt_json_is_named(fx, tmp_path, name) -> None:
    from lutq.kd import build_cache

    out = _copy(fx.cache, tmp_path / "cache")
    if name == "progress.json":  # an unfinished cache: progress.json and no meta.json
        (out / "meta.json").unlink()
    (out / name).write_text("{")
    with pytest.raises(LutqError, match=rf"{name}: invalid JSON"):
        build_cache(fx.cfg.replace(out=out), teacher=fx.teacher)


def test_cache_rerun_rewrites_a_truncated_shard(fx, tmp_path) -> None:
    """A shard left truncated by outside damage (a partial copy) is not taken as done: re-running `lutq cache`
    writes it again (byte-identical) instead of reporting a complete cache."""
    from lutq.kd import KDCache, build_cache

    out = _copy(fx.cache, tmp_path / "cache")
    shard = out / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-9])
    build_cache(fx.cfg.replace(out=out), teacher=fx.teacher)
    assert sha256_file(shard) == sha256_file(fx.cache / shard.name)
    KDCache(out).verify_checksums()


def test_student_without_tokenizer_or_with_a_smaller_vocabulary(fx) -> None:
    from lutq.kd import KDCache

    cache = KDCache(fx.cache)
    with pytest.raises(LutqError, match="no tokenizer"):
        cache.check_tokenizer(None)
    small = tiny_model("llama", vocab_size=288)
    with pytest.raises(LutqError, match=r"vocabulary of 288.*320"):
        cache.check_tokenizer(fx.teacher[1], model=small)
    cache.check_tokenizer(fx.teacher[1], model=fx.teacher[0])


def test_train_student_with_a_smaller_vocabulary_is_refused(fx, tmp_path) -> None:
    from lutq.train.config import TrainConfig
    from lutq.train.trainer import train

    small = tmp_path / "small"
    tiny_model("llama", vocab_size=288).save_pretrained(small)
    tiny_tokenizer().save_pretrained(small)
    cfg = TrainConfig(
        cache=fx.cache,
        out=tmp_path / "run",
        model=str(small),
        steps=1,
        batch_size=4,
        device="cpu",
        init_lut="uniform",
        init_tighten=0,
        init_calib_sequences=0,
        eval_batches=0,
    )
    with pytest.raises(LutqError, match=r"vocabulary of 288"):
        train(cfg)


# --- LUT checkpoints ------------------------------------------------------------------------------------


def _fix_weights_record(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    _edit_json(ckpt / "config.json", lambda c: c["weights"].update(bytes=w.stat().st_size, sha256=sha256_file(w)))


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda c: c.update(quant="q2a4"), "quant"),
        (lambda c: c.update(weights="model.safetensors"), "weights"),
        (lambda c: c.update(base_config=[]), "base_config"),
        (lambda c: next(iter(c["quant"]["layers"].values())).pop("rank"), "rank"),
    ],
)
def test_checkpoint_malformed_config_is_named(fx, tmp_path, edit, what) -> None:
    from lutq.models import load_checkpoint

    bad = _copy(fx.ckpt, tmp_path / "q2")
    _edit_json(bad / "config.json", edit)
    with pytest.raises(LutqError, match=rf"config\.json.*{what}"):
        load_checkpoint(bad)


def test_checkpoint_tensor_with_wrong_dtype_is_named(fx, tmp_path) -> None:
    from lutq.models import load_checkpoint

    bad = _copy(fx.ckpt, tmp_path / "q2")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.input_layernorm.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, bad / "model.safetensors")
    _fix_weights_record(bad)
    with pytest.raises(LutqError, match=rf"model\.safetensors: {name} has dtype torch\.int32"):
        load_checkpoint(bad)


def test_checkpoint_corrupt_tokenizer_is_named(fx, tmp_path) -> None:
    from lutq.models import load_checkpoint

    bad = _copy(fx.ckpt, tmp_path / "q2")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(LutqError, match=rf"{bad}.*tokenizer"):
        load_checkpoint(bad)


def test_snap_refuses_a_non_finite_model_and_keeps_the_checkpoint(fx, tmp_path) -> None:
    bad = _copy(fx.ckpt, tmp_path / "q2")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.scale_g"
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, bad / "model.safetensors")
    _fix_weights_record(bad)
    before = _tree_digest(bad)
    res = CliRunner().invoke(app, ["snap", str(bad)])  # in place
    assert isinstance(res.exception, LutqError) and "not finite" in str(res.exception), res.output
    assert _tree_digest(bad) == before


def test_eval_ppl_needs_a_tokenizer_that_fits_the_model(fx, tmp_path) -> None:
    from lutq.evaluate.perplexity import perplexity
    from lutq.models import load_checkpoint

    no_tok = _copy(fx.ckpt, tmp_path / "q2")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tok / f).unlink()
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "ppl",
            "-m",
            str(no_tok),
            "-t",
            str(fx.root / "docs.jsonl"),
            "--max-length",
            "16",
            "--stride",
            "8",
            "--max-tokens",
            "32",
        ],
    )
    assert isinstance(res.exception, LutqError) and "no tokenizer" in str(res.exception), res.output
    model, tok, _ = load_checkpoint(fx.ckpt)
    tok.add_tokens([f"<x{i}>" for i in range(80)])  # ids 259..338, the model has 320 rows
    with pytest.raises(LutqError, match=r"token id 3\d\d.*320"):
        perplexity(model, tok, "<x70> <x75> and more", max_length=16, stride=8)


# --- runs: resume, run.json, trainer state ---------------------------------------------------------------


def test_train_resume_with_bad_state_or_changed_mode(fx, tmp_path) -> None:
    from lutq.train.config import TrainConfig
    from lutq.train.trainer import train

    run = tmp_path / "run"
    cfg = TrainConfig(
        cache=fx.cache,
        out=run,
        init=fx.ckpt,
        steps=1,
        batch_size=4,
        device="cpu",
        eval_batches=0,
        log_every=1,
        save_every=1,
    )
    train(cfg)
    with pytest.raises(LutqError, match=r"cannot resume with mode changed .*--init .*last"):
        train(cfg.replace(steps=2, mode="mlp-only"), resume=True)
    state = run / "last" / "trainer_state" / "state.pt"
    saved = torch.load(state, weights_only=True)
    del saved["scheduler"]
    torch.save(saved, state)
    with pytest.raises(LutqError, match=r"state\.pt: .*scheduler"):
        train(cfg.replace(steps=2), resume=True)
    (run / "run.json").write_text("[1]")
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert isinstance(res.exception, LutqError) and "run.json" in str(res.exception), res.output


# --- pretraining ----------------------------------------------------------------------------------------

SMALL = {**TINY_PRETRAIN, "grad_accum": 1, "steps": 4, "warmup": 1, "eval_every": 2, "eval_iters": 1, "save_every": 2}


@pytest.fixture(scope="module")
def token_file(fx) -> Path:
    from lutq.data.tokens import prepare_tokens

    tiny_tokenizer().save_pretrained(fx.root / "tok")
    return prepare_tokens(str(fx.root / "tok"), [str(fx.root / "docs.jsonl")], fx.root / "data.npy", workers=1).path


def _token_copy(token_file: Path, dst: Path) -> Path:
    from lutq.data.tokens import meta_path

    dst.mkdir()
    shutil.copy(token_file, dst / token_file.name)
    shutil.copy(meta_path(token_file), meta_path(dst / token_file.name))
    return dst / token_file.name


def test_token_file_with_ids_past_the_vocabulary_is_named(token_file, tmp_path) -> None:
    from lutq.pretrain import PretrainConfig, pretrain

    data = _token_copy(token_file, tmp_path / "d")
    ids = np.load(data)
    ids[::7] = 60000
    np.save(data, ids)
    with pytest.raises(LutqError, match=rf"{data}: token id 60000 .*vocab"):
        pretrain(PretrainConfig(data=str(data), out=str(tmp_path / "run"), **SMALL))


def test_token_meta_with_a_wrong_type_is_named(token_file, tmp_path) -> None:
    from lutq.data.tokens import TokenData, meta_path

    data = _token_copy(token_file, tmp_path / "d")
    _edit_json(meta_path(data), lambda m: m.update(vocab_size="259"))
    with pytest.raises(LutqError, match=r"meta\.json: vocab_size"):
        TokenData.open(data)


def test_pretrain_resume_uses_the_given_run_dir_and_names_a_bad_state(token_file, tmp_path) -> None:
    from lutq.pretrain import PretrainConfig, load_run_config, pretrain

    first = tmp_path / "first"
    pretrain(PretrainConfig(data=str(token_file), out=str(first), stop_after=2, **SMALL))
    before = _tree_digest(first)
    moved = _copy(first, tmp_path / "moved")
    assert load_run_config(moved).out == str(moved)
    res = CliRunner().invoke(app, ["pretrain", "--resume", str(moved), "--run"])
    assert res.exit_code == 0, res.output
    assert _tree_digest(first) == before  # the copy resumed, the original is untouched
    assert json.loads((moved / "train.jsonl").read_text().splitlines()[-1])["step"] == 4

    state = moved / "last" / "trainer_state" / "state.pt"
    saved = torch.load(state, weights_only=True)
    del saved["optimizer"]
    torch.save(saved, state)
    with pytest.raises(LutqError, match=r"state\.pt: .*optimizer"):
        pretrain(load_run_config(moved), resume=True)
