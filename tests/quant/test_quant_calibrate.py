"""Calibrated init: Hessian collection, GPTQ index picking for LUT layers, quantize(hessians=...), --calib."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import LUTLinear, get_preset, lut_layers, quant_config_of, quantize
from lutq.quant.calibrate import (
    calibration_blocks,
    collect_hessians,
    column_weights,
    gptq_indices_,
    hessians_for,
    output_error,
)
from lutq.quant.init import init_from_weight_, relative_error, repick_indices_, tighten_
from lutq.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def calib_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small JSONL text source for calibration."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    with path.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(f"word{(i * 7 + j) % 50}" for j in range(30))}) + "\n")
    return str(path)


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)  # channels of very different energy, as in real activations
    return (torch.randn(n, d, generator=g) @ mix) * scale


def _layer(w: torch.Tensor, lut_size: int = 4, rank: int = 2) -> LUTLinear:
    layer = LUTLinear(w.shape[1], w.shape[0], lut_size, rank)
    init_from_weight_(layer, w, group_size=8, lut_kind="kmeans", tighten_rounds=2)
    return layer


def test_gptq_lowers_output_error_and_keeps_the_format() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = _correlated_inputs(2048, 64)
    h = x.t() @ x / x.shape[0]
    layer = _layer(w)
    nearest = output_error(layer, w, h)
    lut, scales = layer.lut.clone(), layer.scale_map().clone()
    err = gptq_indices_(layer, w, h)
    assert err < 0.9 * nearest  # 2-bit on correlated inputs: GPTQ clearly beats rounding (0.22 vs 0.28)
    # the metric is what it says: ‖(W_eff − W) xᵀ‖ / ‖W xᵀ‖ on the calibration inputs
    direct = float((x @ (layer.effective_weight().detach() - w).t()).norm() / (x @ w.t()).norm())
    assert err == pytest.approx(direct, rel=1e-3)
    assert torch.equal(layer.lut, lut) and torch.equal(layer.scale_map(), scales)  # only idx moved
    assert layer.idx.dtype == torch.uint8 and int(layer.idx.max()) < layer.lut_size


def test_gptq_with_a_diagonal_hessian_is_nearest_rounding() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 24)
    layer = _layer(w, lut_size=16, rank=1)
    repick_indices_(layer, w)
    nearest = layer.idx.clone()
    gptq_indices_(layer, w, torch.diag(torch.rand(24) + 0.5), damp=0.0)
    assert torch.equal(layer.idx, nearest)  # no correlations: nothing to compensate


def test_gptq_handles_dead_inputs_and_rejects_bad_shapes() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 16)
    x = _correlated_inputs(256, 16)
    x[:, 3] = 0.0  # an input that is never active
    layer = _layer(w)
    err = gptq_indices_(layer, w, x.t() @ x / 256)
    assert 0.0 <= err < 1.0
    with pytest.raises(LutqError, match="does not match"):
        gptq_indices_(layer, w, torch.eye(8))


def test_collect_hessians_matches_the_inputs_and_shares_siblings() -> None:
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=ids[:1])
    handle.remove()
    hs = collect_hessians(model, ids, batch_size=2, show_progress=False)
    assert "lm_head" in hs and "model.layers.1.self_attn.k_proj" in hs
    # q/k/v read one tensor, and so do gate/up: one H each, shared
    att = "model.layers.0.self_attn."
    assert hs[att + "k_proj"] is hs[att + "q_proj"] and hs[att + "v_proj"] is hs[att + "q_proj"]
    assert hs[att + "o_proj"] is not hs[att + "q_proj"]
    mlp = "model.layers.0.mlp."
    assert hs[mlp + "up_proj"] is hs[mlp + "gate_proj"] and hs[mlp + "down_proj"] is not hs[mlp + "gate_proj"]
    h = hs[mlp + "down_proj"]
    assert torch.allclose(h, h.t()) and float(torch.linalg.eigvalsh(h.double()).min()) > -1e-6
    # the first sequence alone gives its own x xᵀ / n
    one = collect_hessians(model, ids[:1], [mlp + "down_proj"], show_progress=False)[mlp + "down_proj"]
    assert torch.allclose(one, seen["x"].t() @ seen["x"] / seen["x"].shape[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(LutqError, match="token blocks"):
        collect_hessians(model, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3"])
def test_quantize_with_hessians_beats_nearest_on_the_calibration_inputs(arch: str, calib_source: str) -> None:
    fp = tiny_model(arch)
    ids = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    hs = (
        hessians_for(fp, "q2a4", calib_source, tiny_tokenizer(), num_sequences=8, seq_len=16, show_progress=False)
        if arch == "llama"
        else collect_hessians(fp, ids, show_progress=False)
    )
    assert "lm_head" not in hs or arch != "llama"  # hessians_for: only what the preset quantizes
    plain, calibrated = tiny_model(arch), tiny_model(arch)
    quantize(plain, "q2a4", progress=False)
    report = quantize(calibrated, "q2a4", hessians=hs, progress=False)
    assert all(r.out_error is not None for r in report.rows)
    assert report.to_dict()["summary"]["mlp"]["mean_out_error"] == pytest.approx(report.mean_out_error("mlp"))
    fp_weights = {n: m.weight for n, m in fp.named_modules() if isinstance(m, nn.Linear)}
    before = [output_error(layer, fp_weights[n], hs[n]) for n, layer in lut_layers(plain)]
    after = [r.out_error for r in report.rows]
    assert sum(after) < sum(before)
    assert report.table() is not None


def test_calibration_blocks_from_a_source_and_errors(calib_source: str) -> None:
    tok = tiny_tokenizer()
    blocks = calibration_blocks(calib_source, tok, num_sequences=5, seq_len=32)
    assert blocks.shape == (5, 32) and blocks.dtype == torch.long
    with pytest.raises(LutqError, match="fewer than"):
        calibration_blocks(calib_source, tok, num_sequences=5, seq_len=100_000)


def test_calibration_blocks_spread_over_documents(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for w in words:  # six long documents, each one word repeated
        (tmp_path / f"{w}.txt").write_text(" ".join([w] * 400))
    from lutq.data import load_documents

    train = [d.id.removesuffix(".txt") for d in load_documents(f"{tmp_path}:train")]  # the held-out split aside
    assert len(train) >= 4
    blocks = calibration_blocks(str(tmp_path), tok, num_sequences=len(train), seq_len=16)
    texts = [tok.decode(b) for b in blocks]
    # one block from each train document, not all from the first file's first pages
    assert all(sum(w in t for w in words) == 1 for t in texts)
    assert sorted(next(w for w in words if w in t) for t in texts) == sorted(train)
    # documents shorter than a block: packed back to back instead of giving nothing
    short = tmp_path / "short"
    short.mkdir()
    for i in range(20):
        (short / f"{i}.txt").write_text(f"note {i}")
    assert calibration_blocks(str(short), tok, num_sequences=2, seq_len=8).shape == (2, 8)


def test_calibration_blocks_from_a_kd_cache(tmp_path: Path, calib_source: str) -> None:
    from lutq.kd import CacheConfig, build_cache

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")

    def cache_of(seq_len: int, name: str) -> Path:
        return build_cache(
            CacheConfig(
                model=str(tmp_path / "teacher"),
                source=calib_source,
                thinking="none",
                seq_len=seq_len,
                top_k=4,
                num_sequences=12,
                out=tmp_path / name,
                device="cpu",
            )
        )

    cache = cache_of(16, "cache")
    blocks = calibration_blocks(str(cache), tok, num_sequences=6)
    assert blocks.shape == (6, 16)
    # an even mix, interleaved; the cache's L is the block length of the whole mix
    mix = calibration_blocks([calib_source, str(cache)], tok, num_sequences=7, seq_len=64)
    text = calibration_blocks(calib_source, tok, num_sequences=4, seq_len=16)
    assert mix.shape == (7, 16)
    torch.testing.assert_close(mix[0::2], text)
    torch.testing.assert_close(mix[1::2], blocks[:3])
    with pytest.raises(LutqError, match="cannot be shared"):
        calibration_blocks([calib_source, str(cache)], tok, num_sequences=1)
    with pytest.raises(LutqError, match="different lengths"):
        calibration_blocks([str(cache), str(cache_of(8, "short"))], tok, num_sequences=4)


def test_quantize_cli_with_calibration(tmp_path: Path, calib_source: str) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("qwen3"), tiny_tokenizer())
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            "--model",
            str(tmp_path / "fp"),
            "--preset",
            "q4a4",
            "--out",
            str(tmp_path / "q4"),
            "--calib",
            calib_source,
            "--calib-sequences",
            "4",
            "--calib-len",
            "24",
            "--damp",
            "0.05",
            "--act-power",
            "0.25",
            "--summary",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "output error" in result.output
    q4, _, info = load_checkpoint(tmp_path / "q4")
    assert quant_config_of(q4).gptq_damp == 0.05  # --damp reached the config the layers were picked with
    assert quant_config_of(q4).init_act_power == 0.25  # and so did --act-power
    assert info.extra["calibration"]["sequences"] == 4 and "mean_out_error" in info.extra["quantize"]["mlp"]
    assert info.extra["calibration"]["source"] == calib_source
    assert get_preset("q4a4").gptq_damp == 0.01
    # --calib repeated: an even mix, recorded as the list it was
    args = ["quantize", "-m", str(tmp_path / "fp"), "-p", "q4a4", "-o", str(tmp_path / "mix"), "--calib-sequences", "4"]
    result = CliRunner().invoke(app, [*args, "--calib", calib_source, "--calib", f"{calib_source}:train"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "mix")[2].extra["calibration"]["source"] == [
        calib_source,
        f"{calib_source}:train",
    ]


def test_convert_q4_to_q2_with_hessians_of_the_q4_model(calib_source: str) -> None:
    from lutq.quant import convert_q4_to_q2

    tok = tiny_tokenizer()
    plain, calibrated = tiny_model("llama"), tiny_model("llama")
    for m in (plain, calibrated):
        quantize(m, "q4a4", progress=False)
    hs = hessians_for(calibrated, "q2a4", calib_source, tok, num_sequences=6, seq_len=16, show_progress=False)
    assert set(hs) == {n for n, _ in lut_layers(calibrated)}  # LUT layers are calibrated too
    targets = {n: (layer.q() * layer.scale_map()).detach() for n, layer in lut_layers(plain)}
    convert_q4_to_q2(plain)
    report = convert_q4_to_q2(calibrated, hessians=hs)
    before = [output_error(layer, targets[n], hs[n]) for n, layer in lut_layers(plain)]
    assert sum(r.out_error for r in report.rows) < sum(before)


def test_convert_cli_with_calibration(tmp_path: Path, calib_source: str) -> None:
    model = tiny_model("qwen3")
    quantize(model, "q4a4", progress=False)
    save_checkpoint(tmp_path / "q4", model, tiny_tokenizer())
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "q4-to-q2",
            str(tmp_path / "q4"),
            str(tmp_path / "q2"),
            "--calib",
            calib_source,
            "--calib-sequences",
            "4",
            "--calib-len",
            "24",
            "--act-power",
            "0.25",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "output error" in result.output
    assert load_checkpoint(tmp_path / "q2")[2].extra["converted"]["calibration"]["act_power"] == 0.25
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "q4-to-q2",
            str(tmp_path / "q4"),
            str(tmp_path / "q2b"),
            "--calib",
            calib_source,
            "--calib-sequences",
            "4",
            "--calib-len",
            "24",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output  # without the flag: the q4 checkpoint's init_act_power
    assert load_checkpoint(tmp_path / "q2b")[2].extra["converted"]["calibration"]["act_power"] == 0.5


def test_refit_scales_in_the_output_metric_never_hurts() -> None:
    from lutq.quant.calibrate import calibrate_layer_, refit_scales_

    torch.manual_seed(3)
    w = torch.randn(40, 32)
    x = _correlated_inputs(1024, 32, seed=3)
    h = x.t() @ x / x.shape[0]
    layer = _layer(w, lut_size=4, rank=4)
    gptq = gptq_indices_(layer, w, h)
    idx = layer.idx.clone()
    refit = refit_scales_(layer, w, h)
    assert refit <= gptq and torch.equal(layer.idx, idx)  # scales only
    assert refit == pytest.approx(output_error(layer, w, h))
    assert float(layer.scale_g.detach().min()) > 0
    fresh = _layer(w, lut_size=4, rank=4)
    assert calibrate_layer_(fresh, w, h, refit_rounds=2) <= gptq + 1e-9


def test_calibration_error_paths() -> None:
    from lutq.quant.calibrate import _upper_cholesky_of_inverse

    model = tiny_model("llama")
    hs = collect_hessians(model, torch.randint(0, 320, (2, 8)), show_progress=False)
    with pytest.raises(LutqError, match="latent"):
        quantize(model, get_preset("q4a4").replace(mode="latent"), hessians=hs, progress=False)
    with pytest.raises(LutqError, match="not positive definite"):
        _upper_cholesky_of_inverse(-torch.eye(4))
    with pytest.raises(LutqError, match="none of the named layers"):
        collect_hessians(model, torch.zeros(1, 4, dtype=torch.long), ["model.norm"])


def test_hessians_without_the_head_skip_the_logits() -> None:
    model = tiny_model("qwen3")
    calls: list[int] = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))
    body_only = collect_hessians(model, ids, ["model.layers.0.mlp.down_proj"], show_progress=False)
    assert calls == []  # the vocabulary-sized projection never ran
    full = collect_hessians(model, ids, ["model.layers.0.mlp.down_proj", "lm_head"], show_progress=False)
    assert calls and torch.allclose(body_only["model.layers.0.mlp.down_proj"], full["model.layers.0.mlp.down_proj"])


def test_column_weights_normalize_diag_h_and_power_zero_is_plain() -> None:
    h = torch.diag(torch.tensor([4.0, 1.0, 0.0, 3.0]))
    assert torch.allclose(column_weights(h, 1.0), torch.tensor([2.0, 0.5, 0.0, 1.5]))
    assert torch.allclose(column_weights(h, 0.5), torch.tensor([2.0, 0.5, 0.0, 1.5]).sqrt())
    assert torch.equal(column_weights(h, 0.0)[:2], torch.ones(2))


def test_activation_weighted_init_fits_the_heavy_columns_better() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    heavy = torch.ones(64)
    heavy[:8] = 100.0  # the first 8 inputs carry nearly all the activation energy

    def heavy_error(col_weight: torch.Tensor | None) -> float:
        layer = LUTLinear(64, 32, 4, 2)
        init_from_weight_(layer, w, group_size=8, lut_kind="kmeans", tighten_rounds=2, col_weight=col_weight)
        with torch.no_grad():
            return float((layer.q() * layer.scale_map() - w)[:, :8].norm() / w[:, :8].norm())

    assert heavy_error(heavy) < 0.9 * heavy_error(None)
    # uniform column weights are the plain init, bit for bit
    a, b = LUTLinear(64, 32, 4, 2), LUTLinear(64, 32, 4, 2)
    init_from_weight_(a, w, group_size=8, lut_kind="kmeans", tighten_rounds=2)
    init_from_weight_(b, w, group_size=8, lut_kind="kmeans", tighten_rounds=2, col_weight=torch.ones(64))
    assert torch.equal(a.idx, b.idx) and torch.allclose(a.lut, b.lut)
    assert torch.allclose(a.scale_map(), b.scale_map(), rtol=1e-5, atol=1e-6)


def test_weighted_tighten_never_raises_the_weighted_error() -> None:
    torch.manual_seed(1)
    w = torch.randn(24, 40)
    cw = torch.rand(40) * 5
    layer = LUTLinear(40, 24, 4, 3)
    init_from_weight_(layer, w, group_size=8, lut_kind="kmeans")
    errors = tighten_(layer, w, 4, cw)
    assert all(b <= a for a, b in itertools.pairwise(errors))
    assert errors[-1] == pytest.approx(relative_error(layer, w, cw))


def test_quantize_with_act_power_records_it_and_rejects_negative(calib_source: str) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = get_preset("q4a4").with_lut_kind("kmeans").replace(init_act_power=0.5, tighten_rounds=1)
    h = hessians_for(model, cfg, calib_source, tok, num_sequences=8, seq_len=16, show_progress=False)
    report = quantize(model, cfg, hessians=h, progress=False)
    assert all(r.out_error is not None for r in report.rows)
    assert quant_config_of(model).init_act_power == 0.5
    with pytest.raises(LutqError, match="init_act_power"):
        get_preset("q4a4").replace(init_act_power=-1.0)
