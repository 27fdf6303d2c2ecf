"""Audit of `lutq eval` and `lutq chat`: compare rows of checkpoints with the same directory name, checks that
fail before the slow work (KD tokenizer, window options), and sampling settings that parse to NaN."""

from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.evaluate import ChatConfig, compare
from lutq.evaluate.compare import CompareConfig, evaluate_model, model_labels
from lutq.testing import tiny_model, tiny_tokenizer

PPL = {"max_length": 64, "stride": 32}


def test_compare_keeps_checkpoints_that_share_a_directory_name(eval_dir, tmp_path) -> None:
    """`lutq eval compare runs/q4a4/best runs/q2a4/best` (the docs' own example) labelled both rows "best",
    and the {label: spec} dict kept only the last: one model silently went unevaluated."""
    for run, src in (("q4", "fp"), ("q2", "q2")):
        shutil.copytree(eval_dir / src, tmp_path / run / "best")
    specs = [str(tmp_path / "q4" / "best"), str(tmp_path / "q2" / "best")]
    res = compare(specs, texts=[str(eval_dir / "text.txt")], **PPL)
    rows = res.rows()
    assert [r["label"] for r in rows] == ["q4/best", "q2/best"] and [r["model"] for r in rows] == specs
    assert rows[0]["size"]["lut"] is None and rows[1]["size"]["lut"] is not None  # really two models
    md = res.markdown().splitlines()
    assert md[2].startswith("| q4/best |") and md[3].startswith("| q2/best |")


def test_model_labels_are_distinct_and_short() -> None:
    assert model_labels(["smollm2-135m-instruct", "runs/a/best", "runs/b/best"]) == {
        "smollm2-135m-instruct": "smollm2-135m-instruct",
        "a/best": "runs/a/best",
        "b/best": "runs/b/best",
    }
    assert model_labels(["/x/a/best", "/y/a/best", "best"]) == {
        "x/a/best": "/x/a/best",
        "y/a/best": "/y/a/best",
        "best": "best",
    }
    assert list(model_labels(["m", "m"])) == ["m", "m (2)"]  # the same spec twice: two rows, told apart


def test_kd_tokenizer_mismatch_fails_before_perplexity(eval_dir, eval_cache, monkeypatch) -> None:
    """A student whose tokenizer does not match the cache was refused only after every text's perplexity."""
    from lutq.kd import KDCache

    def no_ppl(*a, **kw):
        raise AssertionError("perplexity ran before the cache check")

    # the module, not the function of the same name that lutq.evaluate exports
    monkeypatch.setattr(importlib.import_module("lutq.evaluate.perplexity"), "perplexity", no_ppl)
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(LutqError, match="tokenizer mismatch"):
        evaluate_model(tiny_model("qwen3"), other, {"t": ["some text"]}, CompareConfig(**PPL), KDCache(eval_cache))


@pytest.mark.parametrize(
    ("kw", "flags", "what"),
    [
        ({"stride": 64}, ["--stride", "64"], "stride"),
        ({"max_tokens": 1}, ["--stride", "32", "--max-tokens", "1"], "max_tokens"),
    ],
)
def test_bad_window_options_fail_before_a_model_loads(eval_dir, tmp_path, kw, flags, what) -> None:
    """compare and `eval ppl` loaded (possibly downloaded) a model before refusing --stride >= --max-length."""
    from lutq.cli import app

    missing = str(tmp_path / "no-such-model")
    text = str(eval_dir / "text.txt")
    with pytest.raises(LutqError, match=what):
        compare([missing], texts=[text], **(PPL | kw))
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", missing, "--text", text, "--max-length", "64", *flags])
    assert res.exit_code != 0 and isinstance(res.exception, LutqError) and what in str(res.exception)


def test_compare_json_lists_every_model(eval_dir, tmp_path) -> None:
    """The CLI's --json holds one row per model given, in order, even when their names collide."""
    from lutq.cli import app

    for run in ("a", "b"):
        shutil.copytree(eval_dir / "fp", tmp_path / run / "best")
    args = ["eval", "compare", str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best")]
    args += ["--text", str(eval_dir / "text.txt"), "--max-length", "64", "--stride", "32"]
    res = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["a/best", "b/best"]
    assert rows[0]["ppl"] == rows[1]["ppl"]  # the same weights: the same numbers


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"repetition_penalty": math.nan},
        {"repetition_penalty": math.inf},
    ],
)
def test_chat_refuses_nan_and_infinite_settings(kw: dict) -> None:
    """`--temperature nan` passed `temperature <= 0` and reached transformers' generate (a ValueError
    deep inside it, or, for inf, uniform sampling); the check now refuses it with a LutqError."""
    with pytest.raises(LutqError, match=next(iter(kw))):
        ChatConfig(**kw).validate()
    ChatConfig(greedy=True, temperature=math.nan).validate()  # greedy ignores the temperature
