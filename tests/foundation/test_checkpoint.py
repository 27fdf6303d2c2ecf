"""Checkpoint directory: bit-exact round trip, trainer state, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lutq.core import LutqError
from lutq.models import load_checkpoint, load_model, load_trainer_state, save_checkpoint
from lutq.testing import tiny_model, tiny_tokenizer


def test_round_trip_bit_exact(tmp_path: Path, tiny_arch: str) -> None:
    model = tiny_model(tiny_arch)
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer(), extra={"note": "x"})
    loaded, tok, info = load_checkpoint(tmp_path / "ck")
    assert info.extra == {"note": "x"} and tok is not None
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    loaded2, _ = load_model(tmp_path / "ck")  # the one loader also takes checkpoints
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded2(ids).logits, model(ids).logits)


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2]])).logits.sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "ck", model, trainer_state=state)
    got = load_trainer_state(tmp_path / "ck")
    assert got["step"] == 7 and torch.equal(got["rng"], state["rng"])
    assert json.loads((tmp_path / "ck/trainer_state/state.json").read_text()) == {"step": 7}


def test_overwrite_is_atomic_on_failure(tmp_path: Path) -> None:
    model = tiny_model("llama")
    save_checkpoint(tmp_path / "ck", model)
    before = (tmp_path / "ck/model.safetensors").read_bytes()

    class Boom:
        def save_pretrained(self, path: Path) -> None:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", model, Boom())
    assert (tmp_path / "ck/model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ck", tiny_model("qwen3"))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LutqError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(LutqError, match=r"model.safetensors: missing"):
        load_checkpoint(ckpt)


def test_truncated_weights(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LutqError, match="truncated"):
        load_checkpoint(ckpt)


def test_corrupt_weights_same_size(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LutqError, match="sha256 mismatch"):
        load_checkpoint(ckpt)


def test_corrupt_safetensors_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"garbage!"
    f.write_bytes(bytes(data))
    with pytest.raises(LutqError, match="corrupt"):
        load_checkpoint(ckpt, verify=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=99), "newer than this lutq"),
        (lambda c: c.update(format="something-else"), "not a lutq checkpoint"),
        (lambda c: c.pop("format_version"), "format_version"),
        (lambda c: c.pop("base_config"), "missing key 'base_config'"),
    ],
)
def test_bad_config(ckpt: Path, edit, message: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LutqError, match=message):
        load_checkpoint(ckpt)


def test_invalid_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(LutqError, match="invalid JSON"):
        load_checkpoint(ckpt)
