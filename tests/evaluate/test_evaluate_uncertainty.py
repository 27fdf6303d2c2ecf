"""Perplexity intervals: Student's t, the ratio estimator's standard error, paired comparisons, coverage."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from lutq.core.errors import LutqError
from lutq.evaluate import compare, perplexity
from lutq.evaluate.uncertainty import (
    format_change,
    format_diff,
    mean_interval,
    paired_mean_diff,
    paired_ppl_ratio,
    ppl_interval,
    ratio_se,
    t_quantile,
)
from lutq.testing import tiny_model, tiny_tokenizer

PPL = {"max_length": 64, "stride": 32}


@pytest.mark.parametrize(
    ("dof", "expected"),  # Student's t 0.975 quantiles from printed tables
    [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)],
)
def test_t_quantile_matches_tables(dof: int, expected: float) -> None:
    assert t_quantile(0.975, dof) == pytest.approx(expected, rel=2e-3)


def test_t_quantile_refuses_zero_dof() -> None:
    with pytest.raises(ValueError, match="dof"):
        t_quantile(0.975, 0)


def test_ratio_se_equal_counts_is_the_standard_error_of_the_mean() -> None:
    rng = random.Random(0)
    means = [rng.gauss(3.0, 0.4) for _ in range(25)]
    se = ratio_se([m * 32 for m in means], [32] * 25)
    assert se == pytest.approx(statistics.stdev(means) / math.sqrt(25), rel=1e-9)
    assert ratio_se([1.0], [4]) is None  # one unit: no spread to measure
    with pytest.raises(ValueError, match="sums"):
        ratio_se([1.0, 2.0], [1])


def test_ppl_interval_covers_the_true_perplexity_about_95_percent() -> None:
    """Segments of 32 tokens whose per-token NLL shares a per-segment offset (passages differ in difficulty):
    the interval over 20 segments should hold exp(true mean NLL) in about 95 % of 400 draws."""
    rng, true_nll, hits, draws = random.Random(1), 2.5, 0, 400
    for _ in range(draws):
        sums, counts = [], []
        for _ in range(20):
            n = rng.choice([24, 32, 32, 40])
            offset = rng.gauss(0.0, 0.5)
            sums.append(sum(true_nll + offset + rng.gauss(0.0, 1.0) for _ in range(n)))
            counts.append(n)
        low, high = ppl_interval(sums, counts)
        hits += low <= math.exp(true_nll) <= high
    assert 0.90 <= hits / draws <= 0.99


def test_paired_ratio_cancels_what_the_segments_share() -> None:
    rng = random.Random(2)
    counts = [32] * 16
    ref = [c * (2.0 + rng.gauss(0, 0.5)) for c in counts]  # passages of very different difficulty
    # a model worse by exactly 0.1 nats on every token: the ratio is e^0.1 with no spread at all
    ratio, low, high = paired_ppl_ratio(ref, [s + 0.1 * c for s, c in zip(ref, counts, strict=True)], counts)
    assert ratio == pytest.approx(math.exp(0.1)) and low == pytest.approx(ratio) and high == pytest.approx(ratio)
    # a noisy 0.1-nat gap: the paired interval is much narrower than either perplexity's own
    noisy = [s + c * (0.1 + rng.gauss(0, 0.02)) for s, c in zip(ref, counts, strict=True)]
    ratio, low, high = paired_ppl_ratio(ref, noisy, counts)
    own_low, own_high = ppl_interval(ref, counts)
    assert low < ratio < high and (high - low) / ratio < (own_high - own_low) / math.exp(sum(ref) / sum(counts)) / 5
    assert format_change(ratio, low, high).startswith("+1")  # +10.x % [...]
    assert paired_ppl_ratio([1.0], [2.0], [4])[1:] == (None, None)
    with pytest.raises(ValueError, match="no tokens"):
        paired_ppl_ratio([1.0], [1.0], [0])
    assert ppl_interval([5 * 256, 120 * 256], [256, 256])[1] == math.inf  # a diverged model: no OverflowError
    with pytest.raises(ValueError, match="segments"):
        paired_ppl_ratio([1.0], [1.0, 2.0], [1, 1])


def test_perplexity_reports_segments_and_interval(text) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    r = perplexity(model, tok, text, show_progress=False, **PPL)
    assert len(r.segment_nll) == len(r.segment_tokens) == r.windows > 2
    assert math.fsum(r.segment_nll) == pytest.approx(r.nll_sum) and sum(r.segment_tokens) == r.tokens
    assert r.ppl_low < r.ppl < r.ppl_high and r.interval_text().startswith("95% CI")
    again = perplexity(model, tok, text, show_progress=False, **PPL)
    assert again.ids_sha256 == r.ids_sha256 and len(r.ids_sha256) == 64
    one = perplexity(model, tok, text, show_progress=False, max_length=64, stride=32, max_tokens=40)
    assert one.windows == 1 and one.ppl_low is None and "one window" in one.interval_text()


def test_compare_pairs_rows_on_the_same_tokens(eval_dir) -> None:
    text = str(eval_dir / "text.txt")
    res = compare(
        {"fp": str(eval_dir / "fp"), "again": str(eval_dir / "fp"), "q2": str(eval_dir / "q2")}, texts=[text], **PPL
    )
    fp_row, again, q2 = res.rows()
    assert "ppl_vs_ref" not in fp_row
    same = again["ppl_vs_ref"][text]
    assert same["ratio"] == pytest.approx(1.0) and same["low"] == pytest.approx(1.0)
    p = q2["ppl_vs_ref"][text]
    assert p["ratio"] == pytest.approx(q2["ppl"][text] / fp_row["ppl"][text], rel=1e-9)
    low, high = q2["ppl_ci"][text]
    assert low < q2["ppl"][text] < high and p["low"] < p["ratio"] < p["high"]
    md = res.markdown()
    assert "Against fp, paired (95% intervals" in md and "KD loss" not in md
    assert f"| q2 | {format_change(p['ratio'], p['low'], p['high'])} |" in md


def test_compare_does_not_pair_other_tokens() -> None:
    from lutq.evaluate.compare import add_paired

    seg = {"nll": [3.0, 4.0], "tokens": [2, 2], "ids_sha256": "a"}
    rows = [{"ppl_segments": {"t": seg}}, {"ppl_segments": {"t": {**seg, "ids_sha256": "b"}}}]
    add_paired(rows, ["t"])
    assert rows[1]["ppl_vs_ref"] == {"t": None}


def test_kd_pairs_only_the_same_ids_in_the_same_units() -> None:
    from lutq.evaluate.compare import paired_changes

    a = {"kd_units": {"n": [2, 2, 2], "kd": [1.0, 2.0, 1.5]}, "kd_unit": "document", "kd_ids_sha256": "x"}
    b = {**a, "kd_units": {"n": [2, 2, 2], "kd": [0.8, 1.8, 1.2]}}
    assert paired_changes(a, b, [])[1]["kd"]["diff"] == pytest.approx(-0.7 / 6)  # unit sums over 6 tokens
    assert paired_changes(a, {**b, "kd_ids_sha256": "y"}, [])[1] is None  # other sequences, same counts
    assert paired_changes(a, {**b, "kd_unit": "batch"}, [])[1] is None


def test_mean_interval_is_the_t_interval_of_equal_units() -> None:
    values = [0.2, 0.4, 0.3, 0.5, 0.1]
    low, high = mean_interval([v * 10 for v in values], [10] * 5)
    half = t_quantile(0.975, 4) * statistics.stdev(values) / math.sqrt(5)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    assert mean_interval([1.0], [3]) is None


def test_kd_intervals_are_taken_over_documents(eval_dir, eval_cache) -> None:
    """The sequences of one document are not independent draws: KD intervals take each document of the split
    as one unit (the cache records which sequence begins which document), summing its sequences' metrics."""
    from lutq.kd import KDCache, evaluate_kd
    from lutq.models import load_model

    cache = KDCache(eval_cache)
    docs = cache.document_units("val")
    assert docs is not None and len(docs) == cache.num_sequences("val")
    assert list(docs) == sorted(docs) and 2 <= len(set(docs)) < len(docs)  # some document spans two sequences
    model, _ = load_model(eval_dir / "q2")
    units: list[dict[str, float]] = []
    metrics = evaluate_kd(model, cache, batch_size=4, per_unit=units)
    assert len(units) == len(set(docs))
    tokens_per_seq = metrics["tokens"] // metrics["sequences"]
    assert [u["n"] for u in units] == [tokens_per_seq * list(docs).count(d) for d in sorted(set(docs))]
    for k in ("kd", "top1_agree", "full_kl"):  # the units' sums add up to the batch means
        assert sum(u[k] for u in units) / metrics["tokens"] == pytest.approx(metrics[k], rel=1e-5, abs=1e-7), k
    pairs: list[dict[str, float]] = []  # batches of 2: some inside one document (their own sums), some across two
    evaluate_kd(model, cache, batch_size=2, per_unit=pairs)
    for got, want in zip(pairs, units, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)

    res = compare({"fp": str(eval_dir / "fp"), "q2": str(eval_dir / "q2")}, cache=eval_cache, kd_batch_size=4)
    fp_row, q2 = res.rows()
    assert q2["kd_unit"] == "document" and q2["kd_units"]["n"] == [u["n"] for u in units]
    low, high = q2["kd_ci"]["kd"]
    assert low < q2["kd"]["kd"] < high
    assert fp_row["kd_ci"]["top1_agree"] == pytest.approx([1.0, 1.0])  # the teacher agrees with its cache everywhere
    md = res.markdown()
    assert f"interval over the cache's val documents ({len(units)} units;" in md
    assert f"| q2 | {q2['kd']['kd']:.4f} [{low:.4f}, {high:.4f}] |" in md


def test_kd_units_fall_back_to_batches_for_an_older_cache(eval_dir, eval_cache, tmp_path) -> None:
    """A cache written before documents were recorded: batches are the units, and the table says so."""
    import json
    import shutil

    from lutq.kd import KDCache, evaluate_kd
    from lutq.models import load_model

    old = tmp_path / "cache"
    shutil.copytree(eval_cache, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["document_starts"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert KDCache(old).document_units("val") is None
    model, _ = load_model(eval_dir / "q2")
    units: list[dict[str, float]] = []
    metrics = evaluate_kd(model, old, batch_size=2, per_unit=units)
    assert len(units) == 3 and sum(u["n"] for u in units) == metrics["tokens"]
    assert sum(u["kd"] for u in units) / metrics["tokens"] == pytest.approx(metrics["kd"])
    res = compare({"q2": str(eval_dir / "q2")}, cache=old, kd_batch_size=2)
    assert res.rows()[0]["kd_unit"] == "batch"
    assert "interval over the cache's val batches (3 of 2 sequences)" in res.markdown()


def test_paired_mean_diff_cancels_shared_batch_difficulty() -> None:
    rng = random.Random(3)
    counts = [64] * 12
    ref = [c * (0.5 + rng.gauss(0, 0.2)) for c in counts]
    better = [s - 0.05 * c for s, c in zip(ref, counts, strict=True)]  # 0.05 lower on every batch
    diff, low, high = paired_mean_diff(ref, better, counts)
    assert diff == pytest.approx(-0.05) and low == pytest.approx(-0.05) and high == pytest.approx(-0.05)
    assert format_diff(diff, low, high) == "-0.0500 [-0.0500, -0.0500]"
    assert paired_mean_diff([1.0], [2.0], [4])[1:] == (None, None)
    with pytest.raises(ValueError, match="units"):
        paired_mean_diff([1.0], [1.0, 2.0], [1, 1])


def test_compare_pairs_against_a_chosen_reference_with_kd(eval_dir, eval_cache) -> None:
    text = str(eval_dir / "text.txt")
    with pytest.raises(LutqError, match="reference 'nope' is none of the models"):
        compare({"fp": str(eval_dir / "fp")}, texts=[text], reference="nope", **PPL)
    res = compare(
        {"fp": str(eval_dir / "fp"), "q2": str(eval_dir / "q2")},
        texts=[text],
        cache=eval_cache,
        kd_batch_size=1,
        reference="q2",
        **PPL,
    )
    fp_row, q2 = res.rows()
    assert res.reference is q2 and "ppl_vs_ref" not in q2 and res.to_dict()["reference"] == "q2"
    p = fp_row["ppl_vs_ref"][text]
    assert p["ratio"] == pytest.approx(fp_row["ppl"][text] / q2["ppl"][text], rel=1e-9)
    d = fp_row["kd_vs_ref"]["kd"]
    assert d["diff"] == pytest.approx(fp_row["kd"]["kd"] - q2["kd"]["kd"], abs=1e-9)
    assert d["low"] < d["diff"] < d["high"] < 0  # the teacher is closer to its own cache, on every batch
    md = res.markdown()
    assert "Against q2, paired" in md and "| model | ppl " in md and "| KD loss | top-1 agree |" in md
    assert (
        f"| fp | {format_change(p['ratio'], p['low'], p['high'])} | {format_diff(d['diff'], d['low'], d['high'])}" in md
    )
    json.dumps(res.to_dict())
