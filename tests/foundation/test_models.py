"""Model loading for every spec kind, architectures, and the real teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lutq.core import LutqError
from lutq.models import architecture_of, load_model
from lutq.testing import tiny_model, tiny_tokenizer


def test_tiny_architectures(tiny: torch.nn.Module, tiny_arch: str) -> None:
    assert architecture_of(tiny) == tiny_arch
    ids = torch.randint(0, 259, (2, 16))
    out = tiny(ids).logits
    assert out.shape == (2, 16, tiny.config.vocab_size)
    assert torch.isfinite(out).all()


def test_load_hf_directory(tmp_path: Path, tiny_arch: str) -> None:
    model = tiny_model(tiny_arch)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    ids = torch.tensor([tok.encode("hello")])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path)
    with pytest.raises(LutqError, match="unsupported architecture"):
        load_model(tmp_path)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(LutqError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(LutqError, match=r"\.gguf"):
        load_model(tmp_path / "w.bin")
    with pytest.raises(LutqError, match="cannot resolve"):
        load_model("./definitely/not/here")
    with pytest.raises(LutqError, match="corpus"):
        load_model("bible")


@pytest.mark.slow
def test_real_teacher_answers(teacher) -> None:
    model, tok = teacher
    assert architecture_of(model) == "llama"
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.slow
def test_teacher_loads_fast_without_gguf(teacher) -> None:
    import time

    from lutq.assets import asset_path

    path = asset_path("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path)
    assert time.perf_counter() - t0 < 30  # generous bound: the point is no GGUF dequantization at load
