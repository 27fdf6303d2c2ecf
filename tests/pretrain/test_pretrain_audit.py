"""Audit of `lutq pretrain`: the end-of-run sample on a one-document corpus, resumes that cannot be exact
(another token file, another world size), the NaN stop's message, and the plan's notes on a warmup longer
than the run and on held-out documents that the run would train on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lutq.pretrain.train as train_mod
from lutq.core.errors import LutqError
from lutq.data.tokens import prepare_tokens
from lutq.pretrain import PretrainConfig, pretrain
from lutq.pretrain.config import make_plan
from lutq.testing import TINY_PRETRAIN, tiny_tokenizer

WORDS = ["the", "king", "and", "queen", "rode", "to", "the", "sea", "where", "ships", "sailed", "at", "night"]


def _prepare(root: Path, name: str, docs: int, words: int = 60) -> Path:
    if not (root / "tok").is_dir():
        tiny_tokenizer().save_pretrained(root / "tok")
    corpus = root / f"corpus-{name}"
    corpus.mkdir()
    for i in range(docs):
        (corpus / f"{i:03d}.txt").write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)))
    return prepare_tokens(str(root / "tok"), [str(corpus)], root / f"{name}.npy", workers=1).path


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("data"), "data", 30)


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(data=str(data), out=str(out), **(TINY_PRETRAIN | kw))


def _plain(text: str) -> str:
    return " ".join(text.split())


def test_sample_of_a_one_document_corpus(tmp_path: Path) -> None:
    """A book prepared as one document ends with its only EOS: the sample's prompt used to start after it,
    empty, and the finished run crashed in the model's forward before writing summary.md."""
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "book.txt").write_text(" ".join(["the king rode to the sea"] * 300))
    data = prepare_tokens(str(tmp_path / "tok"), [str(tmp_path / "book.txt")], tmp_path / "book.npy", workers=1)
    assert int((data.tokens == data.eos_id).sum()) == 1 and int(data.tokens[-1]) == data.eos_id
    result = pretrain(_cfg(data.path, tmp_path / "run", steps=2, sample_tokens=4))
    assert result["sample"]["prompt"].strip() and len(result["sample"]["prompt"]) >= 20
    assert "## sample" in (tmp_path / "run" / "summary.md").read_text()


def test_resume_refuses_a_replaced_token_file(tmp_path: Path) -> None:
    """Re-preparing the token file in place (other sources, another cap) moved the train/held-out split and
    every window: the resume went on silently, neither exact nor held-out."""
    data = _prepare(tmp_path, "data", 30)
    run = tmp_path / "run"
    pretrain(_cfg(data, run, stop_after=2))
    (tmp_path / "corpus-data").rename(tmp_path / "old-corpus")
    _prepare(tmp_path, "data", 40)  # same path, more documents
    with pytest.raises(LutqError, match=r"token file .*data\.npy is not the one the run started on: .*tokens"):
        pretrain(_cfg(data, run), resume=True)
    # the same number of tokens, other contents (a re-prepared file of the same size): the sample digest differs
    other = _prepare(tmp_path, "other", 30)
    pretrain(_cfg(other, tmp_path / "run2", stop_after=2))
    tokens = np.load(other)
    np.save(other, np.ascontiguousarray(tokens[::-1]))
    with pytest.raises(LutqError, match="not the one the run started on: sample_sha256"):
        pretrain(_cfg(other, tmp_path / "run2"), resume=True)
    np.save(other, tokens)  # the original contents (as a copy of the file would be): the resume goes on
    assert pretrain(_cfg(other, tmp_path / "run2"), resume=True)["final_step"] == TINY_PRETRAIN["steps"]


def test_resume_follows_a_moved_token_file(tmp_path: Path) -> None:
    """A token file moved (with its meta) to another place: `--resume RUN --data NEW` goes on, since the file is
    the one the run started on; before, the changed `data` path was refused and the CLI ignored --data."""
    from typer.testing import CliRunner

    from lutq.cli import app
    from lutq.data.tokens import meta_path

    data = _prepare(tmp_path, "data", 30)
    run = tmp_path / "run"
    pretrain(_cfg(data, run, stop_after=2))
    moved = tmp_path / "elsewhere" / "data.npy"
    moved.parent.mkdir()
    data.rename(moved)
    meta_path(data).rename(meta_path(moved))
    res = CliRunner().invoke(app, ["pretrain", "--resume", str(run), "--data", str(moved), "--run"])
    assert res.exit_code == 0, res.output
    assert "ignoring" not in res.output
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]  # continued at step 3 (run.json's stop_after is 2)


def test_resume_refuses_another_world_size(token_file: Path, tmp_path: Path) -> None:
    """run.json records the world size, but a resume under another torchrun --nproc-per-node went on with
    another global batch (micro x accum x world) and other data positions."""
    run = tmp_path / "run"
    pretrain(_cfg(token_file, run, stop_after=2))
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(meta | {"world_size": 2}))
    with pytest.raises(LutqError, match="started with world size 2 and this invocation has 1"):
        pretrain(_cfg(token_file, run), resume=True)
    (run / "run.json").write_text(json.dumps(meta))
    assert pretrain(_cfg(token_file, run), resume=True)["final_step"] == TINY_PRETRAIN["steps"]


def test_nan_stop_names_the_checkpoint_it_has(
    token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NaN stop pointed to RUN/last as the "last good checkpoint" even when no checkpoint existed."""
    real = train_mod.train_step
    calls = {"n": 0}

    def nan_at_step_3(*args, **kw):
        loss, norm = real(*args, **kw)
        calls["n"] += 1
        return (torch.tensor(float("nan")) if calls["n"] == 3 else loss), norm

    monkeypatch.setattr(train_mod, "train_step", nan_at_step_3)
    with pytest.raises(LutqError) as e:
        pretrain(_cfg(token_file, tmp_path / "a", save_every=0))
    msg = _plain(str(e.value))
    assert "loss is nan at step 3" in msg and "no checkpoint was saved" in msg and "last good" not in msg
    calls["n"] = 0
    with pytest.raises(LutqError) as e:
        pretrain(_cfg(token_file, tmp_path / "b", save_every=2))
    assert re.search(r"last good checkpoint: .*b/last at step 2", _plain(str(e.value)))


def test_plan_notes_a_warmup_longer_than_the_run(token_file: Path) -> None:
    """steps <= warmup: the warmup is cut to steps - 1 and the lr never decays; the plan said nothing."""
    long = make_plan(_cfg(token_file, Path("x"), steps=5, warmup=100).resolve(), 2000, 300)
    assert any("--warmup 100 is not shorter than the run" in n and "cut to 4" in n for n in long.notes)
    short = make_plan(_cfg(token_file, Path("x"), steps=5, warmup=2).resolve(), 2000, 300)
    assert not any("--warmup" in n for n in short.notes)
    # the schedule really ends at the peak there (the note is true)
    assert train_mod.lr_factor(4, total=5, warmup=4, min_ratio=0.1) == 1.0


def test_plan_notes_heldout_documents_that_would_be_trained_on(token_file: Path, tmp_path: Path, capsys) -> None:
    """`lutq data prepare` puts the sources' held-out documents last; a --val-fraction tail shorter than them
    trains on some, and `lutq eval ppl --text SRC:val` is then no longer held-out. The plan now says so."""
    from lutq.pretrain.config import heldout_overlap_note

    plan = make_plan(_cfg(token_file, tmp_path, val_fraction=0.05).resolve(), 10_000, 300)
    assert heldout_overlap_note(plan, {"heldout_tail_tokens": plan.val_tokens}) is None
    assert heldout_overlap_note(plan, {}) is None
    note = heldout_overlap_note(plan, {"heldout_tail_tokens": 1234})
    assert note and "734 tokens of them are trained on" in note and "--val-fraction 0.1234" in note
    meta = json.loads(Path(str(token_file) + ".meta.json").read_text())
    heldout = meta["heldout_tail_tokens"]
    fraction = heldout / meta["tokens"] / 2  # a tail half as long as the held-out documents
    pretrain(_cfg(token_file, tmp_path / "run", val_fraction=fraction), run=False)
    assert "are trained on" in _plain(capsys.readouterr().err)


def test_time_limit_stops_with_a_checkpoint_and_resumes_exactly(token_file: Path, tmp_path: Path) -> None:
    """--time-limit ends the run after the step that crossed it, with last/ current and summary.md saying so;
    the resume then gives the uninterrupted run's losses."""
    full = tmp_path / "full"
    pretrain(_cfg(token_file, full))
    part = tmp_path / "part"
    stopped = pretrain(_cfg(token_file, part, time_limit=1e-9))
    assert stopped["stopped_early"] and stopped["final_step"] == 1 and "sample" not in stopped
    assert "stopped early" in (part / "summary.md").read_text()
    assert json.loads((part / "last" / "config.json").read_text())["extra"]["step"] == 1
    pretrain(_cfg(token_file, part), resume=True)

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "train.jsonl").read_text().splitlines()]

    assert losses(part) == losses(full) and len(losses(full)) == TINY_PRETRAIN["steps"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stop_after": 0}, "stop_after must be at least 1"),
        ({"time_limit": 0.0}, "time_limit must be a positive"),
        ({"time_limit": float("nan")}, "time_limit must be a positive"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"save_every": -5}, "save_every must be >= 0"),
        ({"warmup": -1}, "warmup must be >= 0"),
    ],
)
def test_stop_and_interval_options_are_checked(token_file: Path, tmp_path: Path, kw: dict, match: str) -> None:
    """--stop-after 0 / --time-limit 0 trained a step and saved; --time-limit nan never stopped; a negative
    --eval-every / --save-every evaluated / saved every |N| steps (Python's modulo). Now they are refused."""
    with pytest.raises(LutqError, match=match):
        pretrain(_cfg(token_file, tmp_path / "run", **kw), run=False)
    assert not (tmp_path / "run").exists()
