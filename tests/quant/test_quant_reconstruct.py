"""Block-wise calibration: captured block inputs, sequential GPTQ stages, output reconstruction, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core import LutqError
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import lut_layers, quantize
from lutq.quant.reconstruct import (
    ReconstructConfig,
    _block_inputs,
    _run_block,
    _sublayer_stages,
    decoder_layers,
    quantize_blockwise,
    reconstruct_,
)
from lutq.testing import tiny_config, tiny_model, tiny_tokenizer


def _ids(n: int = 16, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _kl(reference: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    p = reference(ids).logits.log_softmax(-1)
    q = model(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def test_captured_block_inputs_reproduce_the_model(tiny_arch: str) -> None:
    """Running the blocks one by one on the captured inputs and kwargs gives the model's own hidden states."""
    model = tiny_model(tiny_arch, layers=3)
    ids = _ids(8)
    xs, kwargs = _block_inputs(model, ids, batch_size=4)
    assert len(xs) == 2 and xs[0].shape == (4, 24, 64)
    hidden = model.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    x = torch.cat(xs)
    assert torch.allclose(x, hidden[0], atol=1e-6)
    for i, block in enumerate(decoder_layers(model)[:-1]):  # the last hidden state has the final norm applied
        x = torch.cat([_run_block(block, c, kwargs[i]) for c in x.split(4)])
        assert torch.allclose(x, hidden[i + 1], atol=1e-5), f"block {i}"


def test_sublayer_stages_follow_the_forward() -> None:
    model = tiny_model("qwen3", layers=1)
    quantize(model, "q4a4", progress=False)
    block = decoder_layers(model)[0]
    layers = {n: m for n, m in lut_layers(model)}
    xs, kwargs = _block_inputs(model, _ids(2), batch_size=2)
    expected = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    for _ in range(30):  # stable run after run (a freed input's reused id() once merged o_proj into gate/up)
        stages = _sublayer_stages(block, layers, xs[0], kwargs[0])
        assert [[n.rsplit(".", 1)[1] for n in s] for s in stages] == expected


def test_reconstruct_beats_nearest_and_never_hurts_a_block(tiny_arch: str) -> None:
    model = tiny_model(tiny_arch, layers=2)
    reference = copy.deepcopy(model)
    quantize(model, "q2a4", progress=False)
    ids, held_out = _ids(16), _ids(8, seed=1)
    nearest = _kl(reference, model, held_out)

    gptq_only = copy.deepcopy(model)
    report = reconstruct_(gptq_only, reference, ids, ReconstructConfig(steps=0), show_progress=False)
    assert all(r.out_error is not None for r in report.rows) and len(report.rows) == 14
    assert all(b["loss_after"] == b["loss_before"] for b in report.blocks)
    assert _kl(reference, gptq_only, held_out) < nearest

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = reconstruct_(model, reference, ids, ReconstructConfig(steps=20, lr=3e-3), show_progress=False)
    assert [b["block"] for b in report.blocks] == [0, 1]
    assert all(b["loss_after"] <= b["loss_before"] for b in report.blocks)
    assert any(b["loss_after"] < b["loss_before"] for b in report.blocks)
    assert _kl(reference, model, held_out) < nearest
    # the trainable flags are as they were, and the reference is untouched (still full precision)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not list(lut_layers(reference))
    # the Q cache kept through the calibration's no_grad passes is dropped at the end
    assert not any("_q_cache" in m.__dict__ for _, m in lut_layers(model))


def test_reconstruct_local_target_and_lut_training() -> None:
    model = tiny_model("llama", layers=2)
    reference = copy.deepcopy(model)
    quantize(model, "q4a4", progress=False)
    luts_before = [la.lut.clone() for _, la in lut_layers(model)]
    cfg = ReconstructConfig(gptq=False, steps=10, lr=3e-3, train_lut=True, target="local")
    report = reconstruct_(model, reference, _ids(8), cfg, show_progress=False)
    assert all(r.out_error is None for r in report.rows)
    luts = [la.lut for _, la in lut_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(luts_before, luts, strict=True))
    for lut in luts:  # still a valid LUT: a buffer again, sorted, FP16-exact
        assert not isinstance(lut, torch.nn.Parameter)
        assert torch.all(lut[1:] > lut[:-1]) and torch.equal(lut, lut.half().float())


def test_quantize_blockwise_is_deterministic() -> None:
    ids = _ids(8)
    states = []
    for _ in range(2):
        model = tiny_model("qwen3", layers=1)
        quantize_blockwise(model, "q4a4", ids, ReconstructConfig(steps=5), show_progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_reconstruct_errors() -> None:
    model = tiny_model("qwen3", layers=2)
    fp = copy.deepcopy(model)
    with pytest.raises(LutqError, match="no LUT layers"):
        reconstruct_(model, fp, _ids(4), show_progress=False)
    quantize(model, "q4a4", progress=False)
    with pytest.raises(LutqError, match="not a full-precision nn.Linear"):
        reconstruct_(model, copy.deepcopy(model), _ids(4), show_progress=False)
    with pytest.raises(LutqError, match="decoder layers"):
        reconstruct_(model, tiny_model("qwen3", layers=3), _ids(4), show_progress=False)
    with pytest.raises(LutqError, match="token blocks"):
        reconstruct_(model, fp, torch.zeros(4, dtype=torch.long), show_progress=False)
    with pytest.raises(LutqError, match="target"):
        reconstruct_(model, fp, _ids(4), ReconstructConfig(target="teacher"), show_progress=False)


def test_reconstruct_stops_on_a_nan_block_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    import lutq.quant.reconstruct as rec

    model = tiny_model("qwen3", layers=1)
    fp = copy.deepcopy(model)
    quantize(model, "q4a4", progress=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    monkeypatch.setattr(rec, "_recon_loss", lambda y, target: y.float().sum() * float("nan"))
    with pytest.raises(LutqError, match="block loss is nan; lower the lr"):
        reconstruct_(model, fp, _ids(4), ReconstructConfig(gptq=False, steps=3), show_progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # trainable flags restored
    assert all(la.mode == "frozen" for _, la in lut_layers(model))


def test_quantize_cli_blockwise(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=2), tiny_tokenizer())
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(20)))
    args = [
        "quantize",
        "-m",
        str(tmp_path / "fp"),
        "-p",
        "q2a4",
        "-o",
        str(tmp_path / "q2"),
        "--summary",
        "--calib",
        str(calib),
        "--calib-sequences",
        "8",
        "--calib-len",
        "32",
        "--blockwise",
        "--recon-steps",
        "3",
        "--recon-latent-steps",
        "2",
        "--recon-latent-start",
        "fp",
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _, _, info = load_checkpoint(tmp_path / "q2")
    cal = info.extra["calibration"]
    assert cal["method"] == "blockwise" and cal["recon"]["steps"] == 3 and len(cal["blocks"]) == 2
    assert cal["recon"]["latent_steps"] == 2 and cal["recon"]["latent_start"] == "fp"
    with pytest.raises(LutqError, match="--blockwise needs --calib"):
        CliRunner().invoke(
            app,
            ["quantize", "-m", str(tmp_path / "fp"), "-o", str(tmp_path / "x"), "--blockwise"],
            catch_exceptions=False,
        )


@pytest.mark.parametrize("start", ["weff", "fp"])
def test_reconstruct_latent_phase_moves_indices_and_ends_frozen(start: str) -> None:
    model = tiny_model("qwen3", layers=2)
    reference = copy.deepcopy(model)
    quantize(model, "q4a4", progress=False)
    ids = _ids(16)
    idx_before = {n: la.idx.clone() for n, la in lut_layers(model)}
    cfg = ReconstructConfig(gptq=False, latent_steps=30, latent_lr=1e-2, steps=10, lr=3e-3, latent_start=start)
    report = reconstruct_(model, reference, ids, cfg, show_progress=False)
    assert all(b["loss_after"] < b["loss_before"] for b in report.blocks)
    layers = dict(lut_layers(model))
    assert {la.mode for la in layers.values()} == {"frozen"}
    assert not any(hasattr(la, "latent") for la in layers.values())
    moved = sum(int((la.idx != idx_before[n]).sum()) for n, la in layers.items())
    assert moved > 0
    with pytest.raises(LutqError, match="lr > 0"):
        ReconstructConfig(latent_lr=0.0).validate()
    with pytest.raises(LutqError, match="latent_start"):
        ReconstructConfig(latent_start="gptq").validate()


def test_convert_cli_blockwise_against_the_fp_reference(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("qwen3", layers=2), tiny_tokenizer())
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(json.dumps({"text": f"row {i} of the calibration text, {i * 7}"}) + "\n" for i in range(40))
    )
    run = CliRunner()
    result = run.invoke(
        app,
        ["quantize", "-m", str(tmp_path / "fp"), "-p", "q4a4", "-o", str(tmp_path / "q4"), "--summary"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    common = ["--calib", str(calib), "--calib-sequences", "8", "--calib-len", "32"]
    result = run.invoke(
        app,
        [
            "convert",
            "q4-to-q2",
            str(tmp_path / "q4"),
            str(tmp_path / "q2"),
            *common,
            "--reference",
            str(tmp_path / "fp"),
            "--recon-steps",
            "4",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    q2, _, info = load_checkpoint(tmp_path / "q2")
    assert {(la.lut_size, la.rank) for n, la in lut_layers(q2) if ".mlp." in n} == {(4, 32)}
    cal = info.extra["converted"]["calibration"]
    assert cal["reference"] == str(tmp_path / "fp") and cal["recon"]["steps"] == 4 and len(cal["blocks"]) == 2
    other = tiny_tokenizer()
    other.add_tokens(["<not-in-the-student>"])
    save_checkpoint(tmp_path / "fp-other-tok", tiny_model("qwen3", layers=2), other)
    with pytest.raises(LutqError, match="another tokenizer"):
        run.invoke(
            app,
            [
                "convert",
                "q4-to-q2",
                str(tmp_path / "q4"),
                str(tmp_path / "y"),
                *common,
                "--reference",
                str(tmp_path / "fp-other-tok"),
            ],
            catch_exceptions=False,
        )
    assert not (tmp_path / "y").exists()  # nothing half-written
    with pytest.raises(LutqError, match="pass calib too"):
        run.invoke(
            app,
            ["convert", "q4-to-q2", str(tmp_path / "q4"), str(tmp_path / "x"), "--reference", str(tmp_path / "fp")],
            catch_exceptions=False,
        )


def test_reconstruct_takes_gptq_damping_from_the_quant_config() -> None:
    ids = _ids(8)
    outs = []
    for damp in (0.01, 10.0):
        model = tiny_model("llama", layers=1)
        reference = copy.deepcopy(model)
        quantize(
            model,
            {
                "preset": "q4a4",
                "mlp": {"lut_size": 16, "rank": 4},
                "attn": {"lut_size": 16, "rank": 4},
                "gptq_damp": damp,
            },
            progress=False,
        )
        report = reconstruct_(model, reference, ids, ReconstructConfig(steps=0), show_progress=False)
        outs.append([r.out_error for r in report.rows])
    assert outs[0] != outs[1]


def test_quantize_blockwise_activation_aware_reinit() -> None:
    """init_act_power > 0: each layer is re-initialized on its block's quantized-prefix Hessian (the LUTs move);
    the block losses still never get worse than before reconstruction."""
    ids = _ids(8)
    luts = {}
    for power in (0.0, 1.0):
        model = tiny_model("llama", layers=2)
        cfg = {
            "mlp": {"lut_size": 4, "rank": 4, "lut_kind": "kmeans"},
            "attn": {"lut_size": 16, "rank": 2, "lut_kind": "kmeans"},
            "init_act_power": power,
        }
        report = quantize_blockwise(model, cfg, ids, ReconstructConfig(steps=3), show_progress=False)
        assert all(b["loss_after"] <= b["loss_before"] for b in report.blocks)
        luts[power] = {n: m.lut.clone() for n, m in lut_layers(model)}
    assert any(not torch.equal(luts[0.0][n], luts[1.0][n]) for n in luts[0.0])


def test_blockwise_reinit_skips_the_thrown_away_plain_init_without_changing_the_result() -> None:
    """With the activation-aware re-init, quantize_blockwise no longer runs the plain init first for the block
    layers: the model is bit-identical to plain init + re-init, biases included, and a quantized lm_head (outside
    the blocks) still gets its plain init."""
    ids = _ids(8)
    cfg = {
        "mlp": {"lut_size": 4, "rank": 4, "lut_kind": "kmeans"},
        "attn": {"lut_size": 16, "rank": 2, "lut_kind": "kmeans"},
        "lm_head": {"lut_size": 16, "rank": 2, "lut_kind": "kmeans"},
        "quantize_lm_head": True,
        "init_act_power": 0.5,
        "tighten_rounds": 1,
    }
    recon = ReconstructConfig(steps=2)
    config = tiny_config("qwen3", layers=2)
    config.attention_bias = True  # q/k/v/o with biases: the skipped init must not drop them
    torch.manual_seed(0)
    fast = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # HF initializes biases to zero, which would hide a dropped bias
    reference = copy.deepcopy(fast)
    quantize_blockwise(fast, cfg, ids, recon, show_progress=False)
    slow = copy.deepcopy(reference)
    quantize(slow, cfg, progress=False)
    reconstruct_(slow, copy.deepcopy(reference), ids, recon, reinit=True, show_progress=False)
    fs, ss = fast.state_dict(), slow.state_dict()
    assert fs.keys() == ss.keys() and all(torch.equal(fs[k], ss[k]) for k in fs)
    q_proj = dict(lut_layers(fast))["model.layers.0.self_attn.q_proj"]
    assert q_proj.bias is not None and torch.equal(q_proj.bias, reference.model.layers[0].self_attn.q_proj.bias)
    head = dict(lut_layers(fast))["lm_head"]
    w = reference.lm_head.weight
    with torch.no_grad():
        assert float((head.q() * head.scale_map() - w).norm() / w.norm()) < 0.5
