"""`lutq pretrain export`: baseline/gqa -> LlamaForCausalLM with matching logits; other variants refused.
Plus the throughput benchmark and torch.compile wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError
from lutq.models import load_model
from lutq.pretrain.bench import bench_pretrain
from lutq.pretrain.checkpoint import load_pretrain_checkpoint, save_pretrain_checkpoint
from lutq.pretrain.export import export_hf
from lutq.pretrain.model import GPT, ModelConfig
from lutq.testing import tiny_tokenizer


def _checkpoint(path: Path, **kw) -> GPT:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), d_model=128, n_layers=2, n_heads=4, d_ff=96, block_size=64, **kw)
    model = GPT(cfg)
    with torch.no_grad():  # trained-looking norms and temperatures, so the mapping of each is tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    save_pretrain_checkpoint(path, model, tokenizer=tok, extra={"step": 1})
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {"variant": "baseline"},
        {"variant": "gqa", "kv_heads": 2},
        {"variant": "gqa", "kv_heads": 1, "learned_temp": False},
    ],
    ids=str,
)
def test_hf_export_logits_match(tmp_path: Path, kw: dict) -> None:
    ours = _checkpoint(tmp_path / "ckpt", **kw)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf, tok = load_model(out)  # the KD pipeline's loader: usable as a teacher
    assert type(hf).__name__ == "LlamaForCausalLM" and len(tok) == ours.config.vocab_size
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"variant": "decoupled"}, "no transformers architecture"),
        ({"variant": "bottleneck"}, "no transformers architecture"),
        ({"null_attn": True}, "no null key/value slot"),
        ({"tie_qk": True}, "separate query and key"),
        ({"norm": "layernorm"}, "Llama uses RMSNorm"),
    ],
)
def test_export_refuses_variants_llama_cannot_express(tmp_path: Path, kw: dict, reason: str) -> None:
    _checkpoint(tmp_path / "ckpt", **kw)
    with pytest.raises(LutqError, match=reason):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_cli_from_a_run_directory(tmp_path: Path) -> None:
    ours = _checkpoint(tmp_path / "run" / "last")
    res = CliRunner().invoke(
        app, ["pretrain", "export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf"), "--dtype", "bf16"]
    )
    assert res.exit_code == 0, res.output
    hf, _ = load_model(tmp_path / "hf", dtype=None)
    assert hf.dtype == torch.bfloat16
    assert hf.config.num_hidden_layers == ours.config.n_layers
    res = CliRunner().invoke(
        app, ["pretrain", "export", str(tmp_path / "run"), str(tmp_path / "x"), "--format", "gguf"]
    )
    assert res.exit_code != 0 and "--format 'gguf'" in str(res.exception)


def test_checkpoint_corruption_is_detected(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ckpt")
    w = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(LutqError, match="sha256 mismatch"):
        load_pretrain_checkpoint(tmp_path / "ckpt")


def test_bench_pretrain_reports_throughput() -> None:
    r = bench_pretrain(
        "tiny",
        "gqa",
        seq_len=32,
        micro_batch=2,
        steps=2,
        device="cpu",
        warmup=1,
        vocab_size=300,
        d_model=64,
        n_layers=2,
    )
    assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_mem_bytes"] > 0
    assert r["mfu"] is None and r["peak_flops"] is None  # CPU: MFU n/a
    assert r["flops_per_token"] > 6 * r["params"] and r["precision"] == "fp32"


def test_compile_flag_trains_through_the_compiled_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile wraps the model in torch.compile (eager backend here: inductor is too slow for a unit test)."""
    from lutq.data.tokens import prepare_tokens
    from lutq.pretrain import PretrainConfig, pretrain

    compiled = []
    real = torch.compile

    def eager_compile(model, **kw):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("to be or not to be " * 120)
    data = prepare_tokens(str(tmp_path / "tok"), [str(tmp_path / "a.txt")], tmp_path / "d.npy", workers=1)
    result = pretrain(
        PretrainConfig(
            data=str(data.path),
            out=str(tmp_path / "run"),
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=32,
            seq_len=16,
            micro_batch=2,
            grad_accum=1,
            steps=2,
            warmup=0,
            eval_iters=1,
            sample_tokens=0,
            val_fraction=0.2,
            compile=True,
        )
    )
    assert len(compiled) == 1 and isinstance(compiled[0], GPT)
    assert result["final_step"] == 2
    model, _ = load_pretrain_checkpoint(tmp_path / "run" / "last")  # saved without the compile wrapper's prefix
    assert model.config.n_layers == 1
    # left unset, compile is on with CUDA only: this CPU run trains eager and run.json records the choice
    compiled.clear()
    pretrain(
        PretrainConfig(
            data=str(data.path),
            out=str(tmp_path / "run2"),
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=32,
            seq_len=16,
            micro_batch=2,
            grad_accum=1,
            steps=1,
            warmup=0,
            eval_iters=1,
            sample_tokens=0,
            val_fraction=0.2,
        )
    )
    assert not compiled
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["pretrain"]["compile"] is False
