"""Comparison tables and the eval CLI: ppl per text, KD metrics, size / bits per weight, markdown + JSON."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.evaluate import compare, model_size, perplexity
from lutq.testing import tiny_model

PPL = {"max_length": 64, "stride": 32}


def test_model_size_fp_and_lut(tokenizer) -> None:
    from lutq.quant import quantize
    from lutq.quant.storage import size_report

    fp = model_size(tiny_model("llama"))
    assert fp["total"]["bits_per_weight"] == 32.0 and fp["lut"] is None
    assert model_size(tiny_model("llama").half())["total"]["bits_per_weight"] == 16.0
    q = tiny_model("llama")
    quantize(q, "q2a4", progress=False)
    size, rep = model_size(q), size_report(q)
    assert size["lut"]["bits_per_weight"] == rep["quantized"]["bits_per_weight"]
    assert set(size["groups"]) == {"mlp", "attn"} and size["total"]["params"] == fp["total"]["params"]
    assert size["total"]["size_mb"] < fp["total"]["size_mb"]


def test_compare_rows_markdown_json(eval_dir, eval_cache) -> None:
    text = str(eval_dir / "text.txt")
    res = compare(
        {"fp": str(eval_dir / "fp"), "q2a4": str(eval_dir / "q2")},
        texts=[text],
        cache=eval_cache,
        kd_max_batches=2,
        **PPL,
    )
    fp_row, q_row = res.rows()
    from lutq.data import load_documents
    from lutq.models import load_model

    model, tok = load_model(eval_dir / "q2")
    assert q_row["ppl"][text] == perplexity(model, tok, load_documents(text), **PPL).ppl
    assert fp_row["size"]["total"]["bits_per_weight"] == 32.0 and q_row["size"]["lut"]["bits_per_weight"] > 2
    # the teacher scored against its own cache agrees with itself; the q2a4 student less so
    assert fp_row["kd"]["top1_agree"] == pytest.approx(1.0) and fp_row["kd"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert q_row["kd"]["kl"] > fp_row["kd"]["kl"]
    # the cache holds teacher_lse: the full-vocabulary (tail-bucket) KL is measured and gets a column
    assert fp_row["kd"]["full_kl"] == pytest.approx(0.0, abs=1e-4) and q_row["kd"]["full_kl"] > 1e-6
    md = res.markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| model | size (MB) | bits/weight | LUT bits/weight | ppl ") and "KD loss" in lines[0]
    assert "| KL | full-vocab KL | top-1 agree |" in lines[0] and f"{q_row['kd']['full_kl']:.4f}" in lines[3]
    assert lines[2].startswith("| fp | ") and lines[3].startswith("| q2a4 | ") and "window 64/32" in md
    assert json.loads(json.dumps(res.to_dict()))["rows"][1]["label"] == "q2a4"


def test_compare_needs_something_to_measure(eval_dir) -> None:
    with pytest.raises(LutqError, match="nothing to measure"):
        compare([str(eval_dir / "fp")])
    with pytest.raises(LutqError, match="unknown key"):
        compare([str(eval_dir / "fp")], texts=[str(eval_dir / "text.txt")], window=3)


def test_eval_cli(eval_dir, eval_cache, tmp_path) -> None:
    from lutq.cli import app

    runner = CliRunner()
    text = str(eval_dir / "text.txt")
    ppl = runner.invoke(
        app,
        [
            "eval",
            "ppl",
            "--model",
            str(eval_dir / "q2"),
            "--text",
            text,
            "--max-length",
            "64",
            "--stride",
            "32",
            "--json",
            str(tmp_path / "ppl.json"),
        ],
    )
    assert ppl.exit_code == 0, ppl.output
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert f"{text}: ppl {saved['ppl'][text]['ppl']:.4f}" in ppl.output
    kd = runner.invoke(app, ["eval", "kd", "--model", str(eval_dir / "q2"), "--cache", str(eval_cache)])
    assert kd.exit_code == 0 and "top1_agree" in kd.output, kd.output
    printed = json.loads(kd.output)
    low, high = printed["ci"]["kd"]
    assert low < printed["kd"] < high and printed["unit"] == "document" and printed["units"] >= 2
    cmp = runner.invoke(
        app,
        [
            "eval",
            "compare",
            str(eval_dir / "fp"),
            str(eval_dir / "q2"),
            "--text",
            text,
            "--max-length",
            "64",
            "--stride",
            "32",
            "--json",
            str(tmp_path / "c.json"),
            "--markdown",
            str(tmp_path / "c.md"),
        ],
    )
    assert cmp.exit_code == 0, cmp.output
    assert (tmp_path / "c.md").read_text() in cmp.output
    assert [r["label"] for r in json.loads((tmp_path / "c.json").read_text())["rows"]] == ["fp", "q2"]
    bad = runner.invoke(app, ["eval", "ppl", "--model", str(eval_dir / "fp"), "--text", "nope.txt"])
    assert bad.exit_code != 0
