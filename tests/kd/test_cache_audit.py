"""Audit of `lutq cache` / `lutq cache verify`: kills, resumes, refused settings and directories, integrity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lutq.kd.cache as cache_mod
from lutq.core import LutqError
from lutq.kd import KDCache, build_cache, verify_cache
from lutq.models import load_model
from lutq.testing import dead_pid, tiny_cache_config, write_teacher_and_docs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher (root/teacher) and plain-text documents (root/docs.jsonl)."""
    root = tmp_path_factory.mktemp("kd-audit")
    write_teacher_and_docs(root)
    return root


@pytest.fixture(scope="module")
def teacher(root: Path):
    return load_model(root / "teacher")


@pytest.fixture(scope="module")
def finished(root: Path, teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny cache (treat as read-only): 16 sequences in shards of 4."""
    out = tmp_path_factory.mktemp("kd-audit-cache") / "cache"
    return build_cache(tiny_cache_config(root, out=out, num_sequences=16, shard_size=4), teacher)


def _kill_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Make the shard writer die (as a kill would stop it) after `shards` shards."""
    real, calls = cache_mod.write_shard, []

    def dying(path, arrays):
        if len(calls) == shards:
            raise KeyboardInterrupt("killed")
        calls.append(path.name)
        return real(path, arrays)

    monkeypatch.setattr(cache_mod, "write_shard", dying)


def test_resume_after_sigkill_removes_the_half_written_shard(root, teacher, finished, tmp_path, monkeypatch):
    cfg = tiny_cache_config(root, out=tmp_path / "c", num_sequences=16, shard_size=4)
    _kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, teacher)
    # what a SIGKILL in the middle of the next atomic shard write (and of a progress.json rewrite) leaves behind
    dead = dead_pid()
    (cfg.out / f".train-00001.safetensors.{dead}.k3x9q1ab.tmp").write_bytes(b"\0" * 1000)
    (cfg.out / f".progress.json.{dead}.zz81mmq2.tmp").write_text("{")
    monkeypatch.undo()
    build_cache(cfg, teacher)
    assert sorted(p.name for p in cfg.out.iterdir() if p.name.startswith(".")) == []
    assert (cfg.out / "meta.json").read_bytes() == (finished / "meta.json").read_bytes()
    KDCache(cfg.out).verify_checksums()


def test_no_training_sequence_left_is_a_config_error(root, teacher, tmp_path):
    # 1 sequence with 5 % held out: the one sequence goes to val; the source is not to blame
    with pytest.raises(LutqError, match=r"num_sequences=1 .*no training sequence"):
        build_cache(tiny_cache_config(root, out=tmp_path / "c", num_sequences=1, val_fraction=0.05), teacher)
    with pytest.raises(LutqError, match=r"max_tokens=40 .*no training sequence"):
        build_cache(tiny_cache_config(root, out=tmp_path / "c", max_tokens=40, val_fraction=0.5), teacher)
    assert not (tmp_path / "c").exists()


def test_overwrite_never_deletes_a_directory_that_is_not_a_cache(root, teacher, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("precious")
    with pytest.raises(LutqError, match=r"data: exists, is not empty and is not a KD cache"):
        build_cache(tiny_cache_config(root, out=data, num_sequences=4, overwrite=True), teacher)
    assert (data / "notes.txt").read_text() == "precious"
    with pytest.raises(LutqError, match=r"notes.txt.*not a directory"):
        build_cache(tiny_cache_config(root, out=data / "notes.txt", num_sequences=4), teacher)
    # an empty directory, or a cache of other settings, is fine to (over)write
    (tmp_path / "empty").mkdir()
    build_cache(tiny_cache_config(root, out=tmp_path / "empty", num_sequences=4), teacher)
    build_cache(tiny_cache_config(root, out=tmp_path / "empty", num_sequences=6, overwrite=True), teacher)
    assert KDCache(tmp_path / "empty").num_sequences("train") == 5


def test_seq_len_beyond_the_teachers_context_is_refused(root, teacher, tmp_path):
    model, _ = teacher
    L = model.config.max_position_embeddings + 1
    with pytest.raises(LutqError, match=rf"L={L}.*max_position_embeddings={L - 1}"):
        build_cache(tiny_cache_config(root, out=tmp_path / "c", seq_len=L, num_sequences=2), teacher)


def test_resume_with_a_changed_teacher_is_refused(root, teacher, tmp_path, monkeypatch):
    cfg = tiny_cache_config(root, out=tmp_path / "c", num_sequences=16, shard_size=4)
    _kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, teacher)
    monkeypatch.undo()
    model, tok = load_model(root / "teacher")
    with torch.no_grad():  # same --model, other weights (e.g. a checkpoint rewritten by a training run)
        model.model.norm.weight.mul_(1.5)
    with pytest.raises(LutqError, match="other settings"):
        build_cache(cfg, (model, tok))
    build_cache(cfg, teacher)  # the original teacher resumes
    meta = json.loads((cfg.out / "meta.json").read_text())
    assert len(meta["teacher_fingerprint"]) == 64


def test_more_sequences_than_the_data_holds_is_recorded(root, teacher, tmp_path, capsys):
    out = build_cache(tiny_cache_config(root, out=tmp_path / "c", num_sequences=5000, shard_size=4096), teacher)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["requested_sequences"] == {"train": 4500, "val": 500}
    assert 0 < meta["sequences"]["train"] < 4500 and 0 < meta["sequences"]["val"] < 500
    assert "gives only" in capsys.readouterr().err  # the console warns on stderr


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_verify_names_the_damaged_shard(finished, teacher, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(finished, bad)
    shard = bad / "train-00002.safetensors"
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(data[:-10])
    else:
        shard.write_bytes(data[:-10] + bytes(10))
    with pytest.raises(LutqError, match=rf"train-00002.safetensors.*{'is missing' if damage == 'missing' else ''}"):
        verify_cache(bad, teacher=teacher)


def test_a_cache_written_before_the_teacher_fingerprint_still_resumes(root, teacher, finished, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    meta = json.loads((old / "meta.json").read_text())
    plan = cache_mod.make_plan(
        tiny_cache_config(root, out=old, num_sequences=16, shard_size=4), *teacher, torch.float32
    )
    meta.pop("teacher_fingerprint")
    meta["plan_hash"] = plan.legacy_hash  # what the previous lutq wrote
    (old / "meta.json").write_text(json.dumps(meta))
    before = (old / "meta.json").read_bytes()
    build_cache(tiny_cache_config(root, out=old, num_sequences=16, shard_size=4), teacher)  # complete: nothing to do
    assert (old / "meta.json").read_bytes() == before
    meta["plan_hash"] = "0" * 64
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LutqError, match="other settings"):
        build_cache(tiny_cache_config(root, out=old, num_sequences=16, shard_size=4), teacher)


def test_cli_refuses_both_sequences_and_max_tokens(tmp_path):
    from typer.testing import CliRunner

    from lutq.cli import app

    res = CliRunner().invoke(app, ["cache", "-n", "100", "--max-tokens", "4096", "-o", str(tmp_path / "c")])
    assert isinstance(res.exception, LutqError) and "not both" in str(res.exception)
    assert not (tmp_path / "c").exists()


def test_a_cache_resumed_on_another_device_says_its_negatives_are_mixed(root, teacher, tmp_path, monkeypatch, capsys):
    import json

    cfg = tiny_cache_config(root, out=tmp_path / "c", num_sequences=16, shard_size=4, negatives=3)
    _kill_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, teacher)
    monkeypatch.undo()
    progress = cfg.out / "progress.json"
    state = json.loads(progress.read_text())
    assert state["negatives_device"] == "cpu"
    progress.write_text(json.dumps(state | {"negatives_device": "cuda"}))  # as if the first part ran on a GPU
    build_cache(cfg, teacher)
    assert "drew their random negatives on cuda" in capsys.readouterr().err.replace("\n", " ")  # the console: stderr
    assert json.loads((cfg.out / "meta.json").read_text())["negatives_device"] == "cuda+cpu"
