"""A real mini recipe on a tiny random Qwen3: cache -> quantize -> train -> convert -> train -> snap -> export
-> eval, through the real stage kinds; then a re-run skips everything and an interrupted stage resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lutq.core import LutqError
from lutq.speedrun.recipe import builtin_recipes, load_recipe
from lutq.speedrun.runner import KINDS
from lutq.speedrun.speedrun import SpeedrunConfig, speedrun
from lutq.speedrun.stages import ConvertParams, QuantizeParams
from lutq.testing import tiny_model, tiny_tokenizer
from lutq.train import RunDir

TRAIN = "batch_size = 4\nwarmup = 1\nlog_every = 1\neval_every = 2\neval_batches = 1\nsave_every = 2\nlr = 1e-3\n"


RECIPE = """
name = "mini"
budget_minutes = 1
report = "eval"

[[stages]]
name = "cache"
kind = "cache"
[stages.params]
model = "{model}"
source = "{docs}"
thinking = "none"
seq_len = 32
top_k = 8
num_sequences = 40
val_fraction = 0.1

[[stages]]
name = "q4a4_init"
kind = "quantize"
[stages.params]
model = "{model}"
preset = "q4a4"
lut_kind = "kmeans"
config = {{ tighten_rounds = 1 }}
calib = "@cache"
calib_sequences = 8

[[stages]]
name = "q4a4"
kind = "train"
[stages.params]
cache = "@cache"
init = "@q4a4_init"
steps = 2
{train}
[[stages]]
name = "q2a4_init"
kind = "convert"
[stages.params]
input = "@q4a4"
calib = "@cache"
calib_sequences = 8
reference = "{model}"
blockwise = {{ steps = 2 }}

[[stages]]
name = "q2a4_direct"
kind = "quantize"
[stages.params]
model = "{model}"
preset = "q2a4"
calib = "@cache"
calib_sequences = 8
blockwise = {{ steps = 2 }}

[[stages]]
name = "q2a4"
kind = "train"
[stages.params]
cache = "@cache"
init = "@q2a4_init"
mode = "mlp-only"
steps = 2
kd = {{ hard_top1_weight = 0.0, full_kl_weight = 1.0 }}
{train}
[[stages]]
name = "snap"
kind = "snap"
[stages.params]
input = "@q2a4"

[[stages]]
name = "export"
kind = "export"
[stages.params]
input = "@snap"
format = "ane"

[[stages]]
name = "eval"
kind = "eval"
[stages.params]
cache = "@cache"
texts = ["{docs}:val"]
options = {{ max_tokens = 256, max_length = 64, stride = 32, kd_max_batches = 1 }}
[stages.params.models]
fp = "{model}"
q4a4 = "@q4a4"
q2a4 = "@snap"
"""


@pytest.fixture(scope="module")
def mini_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    model_dir = root / "tiny-qwen3"
    tiny_model("qwen3").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    docs = root / "docs"
    docs.mkdir()
    words = (
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hum",
        "a",
        "tune",
    )
    for i in range(24):
        text = " ".join(words[(i + j) % len(words)] for j in range(60))
        (docs / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}.\n")
    path = root / "mini.toml"
    path.write_text(RECIPE.format(model=model_dir, docs=docs, train=TRAIN))
    return path


def test_mini_recipe_runs_skips_and_resumes(mini_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "mini"
    res = speedrun(SpeedrunConfig(recipe=str(mini_recipe), run_dir=run_dir))
    status = {r.name: r.status for r in res.stages}
    assert set(status.values()) == {"ran"} and len(status) == len(load_recipe(mini_recipe).stages)
    by = {r.name: r for r in res.stages}
    assert by["q4a4"].summary["step"] == 2 and by["q2a4"].summary["step"] == 2
    assert by["q4a4"].out.name in ("best", "last") and (by["q4a4"].out / "config.json").is_file()
    assert (run_dir / "export" / "out").is_dir() and by["snap"].summary["max_abs_logit_error"] >= 0
    # the quantize and convert stages calibrated on the cache (GPTQ): their reports carry output errors
    assert "mean_out_error" in by["q4a4_init"].summary["rel_error"]["mlp"]
    assert "mean_out_error" in by["q2a4_init"].summary["rel_error"]["mlp"]
    # block-wise calibration: the convert against the FP reference and a direct quantize, one loss pair per block
    assert len(by["q2a4_direct"].summary["block_losses"]) == 2
    assert all(after <= before for before, after in by["q2a4_direct"].summary["block_losses"])
    assert [r["model"] for r in res.rows] == ["fp", "q4a4", "q2a4"] and "| q2a4 |" in res.table
    entry = json.loads((tmp_path / "runs" / "log.jsonl").read_text().splitlines()[-1])
    assert entry["status"] == "complete" and entry["figures"] == res.rows

    # a second run finds everything done
    res = speedrun(SpeedrunConfig(recipe=str(mini_recipe), run_dir=run_dir, log=False))
    assert {r.status for r in res.stages} == {"skipped"}
    # the q2a4 stage trained with the full-vocabulary KL; a cache from before teacher_lse is not a valid output
    assert all(r["full_kl"] > 0 for r in RunDir(run_dir / "q2a4" / "out").rows() if "loss" in r)
    old = tmp_path / "old-cache"
    shutil.copytree(run_dir / "cache" / "out", old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["arrays"]["teacher_lse"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LutqError, match="log-sum-exp"):
        KINDS["cache"].check(SimpleNamespace(out=old), None)

    # an interrupted q2a4 (no done marker, trainer checkpoint present) resumes instead of starting over
    (run_dir / "q2a4" / "done.json").unlink()
    res = speedrun(SpeedrunConfig(recipe=str(mini_recipe), run_dir=run_dir, log=False))
    status = {r.name: r.status for r in res.stages}
    assert status["q2a4"] == "resumed" and status["q4a4"] == "skipped"
    assert status["snap"] == status["export"] == status["eval"] == "ran"  # made from a re-made checkpoint
    rows = [json.loads(x) for x in (run_dir / "q2a4" / "out" / "train.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2 and sum(r["step"] == 0 for r in rows) == 1  # not re-trained


def test_blockwise_params_are_checked() -> None:
    with pytest.raises(LutqError, match="needs `calib`"):
        QuantizeParams(blockwise={"steps": 1}).validate()
    with pytest.raises(LutqError, match="unknown key"):
        QuantizeParams(calib="@cache", blockwise={"stepz": 1}).validate()
    with pytest.raises(LutqError, match="needs `reference`"):
        ConvertParams(calib="@cache", blockwise={"steps": 1}).validate()
    with pytest.raises(LutqError, match="needs `calib`"):
        ConvertParams(reference="m").validate()


def test_builtin_recipes_parse_and_chain_from_the_cache() -> None:
    names = builtin_recipes()
    assert {"default", "q4a4", "q2a4-progressive"} <= set(names)
    for name in names:  # every built-in passes the validation a user's TOML gets (kinds, refs, typed params)
        recipe = load_recipe(name)
        kinds = [s.kind for s in recipe.stages]
        assert kinds[:2] == ["assets", "cache"] and "train" in kinds
        assert recipe.report in {s.name for s in recipe.stages}
    assert load_recipe("default").budget_minutes <= 60  # the CPU budget that issue 5 states
