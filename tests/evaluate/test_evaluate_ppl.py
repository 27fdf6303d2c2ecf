"""Sliding-window perplexity: exact against direct computations, every token scored once, batching-invariant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lutq.assets import Document
from lutq.core.errors import LutqError
from lutq.evaluate import perplexity, windows
from lutq.models import save_checkpoint
from lutq.testing import tiny_model, tiny_tokenizer


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text)["input_ids"])


@torch.no_grad()
def test_window_covering_text_equals_full_sequence(tiny, tokenizer, text) -> None:
    text = text[:300]
    ids = _ids(tokenizer, text)
    assert ids.numel() < 512
    res = perplexity(tiny, tokenizer, text, max_length=512, stride=256)
    direct = F.cross_entropy(tiny(ids[None]).logits[0, :-1].double(), ids[1:], reduction="sum").item()
    assert res.tokens == ids.numel() - 1 and res.windows == 1
    assert res.nll_sum == pytest.approx(direct, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(direct / (ids.numel() - 1)), rel=1e-6)


@torch.no_grad()
def test_strided_windows_equal_hand_rolled_reference(tokenizer, text) -> None:
    model = tiny_model("llama")
    text = text[:500]
    ids = _ids(tokenizer, text)
    max_length, stride = 64, 24
    # reference: the HF "perplexity of fixed-length models" loop, one window at a time, exact sums
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end]
        labels = window.clone()
        labels[: len(window) - (end - prev_end)] = -100
        labels[0] = -100  # the first token of a window has no context inside it
        logits = model(window[None]).logits[0, :-1]
        total += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
        prev_end = end
        if end == ids.numel():
            break
    for batch_size in (1, 3):
        res = perplexity(model, tokenizer, text, max_length=max_length, stride=stride, batch_size=batch_size)
        assert res.tokens == count == ids.numel() - 1
        assert res.nll_sum == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    "n,max_length,stride",
    [(10, 16, 8), (16, 16, 8), (17, 16, 8), (100, 16, 5), (100, 16, 15), (2, 2, 1), (1000, 128, 64)],
)
def test_every_token_after_the_first_is_scored_once(n: int, max_length: int, stride: int) -> None:
    scored: list[int] = []
    for w in windows(n, max_length, stride):
        assert 0 < w.end - w.begin <= max_length and 0 < w.targets < w.end - w.begin + (w.begin == 0)
        scored.extend(range(w.end - w.targets, w.end))
        context = w.end - w.targets - w.begin  # tokens before the first scored one, inside the window
        assert w.begin == 0 or context >= max_length - stride
    assert sorted(scored) == list(range(1, n))


def test_documents_are_joined_with_a_blank_line(tokenizer) -> None:
    model = tiny_model("qwen3")
    docs = [Document(id="a", text="first document."), Document(id="b", text="second one.")]
    a = perplexity(model, tokenizer, docs, max_length=64, stride=32)
    b = perplexity(model, tokenizer, "first document.\n\nsecond one.", max_length=64, stride=32)
    assert a.nll_sum == b.nll_sum and a.tokens == b.tokens
    chat = [Document(id="c", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])]
    rendered = tokenizer.apply_chat_template(chat[0].messages, tokenize=False)
    assert (
        perplexity(model, tokenizer, chat, max_length=64, stride=32).nll_sum
        == perplexity(model, tokenizer, rendered, max_length=64, stride=32).nll_sum
    )


def test_max_tokens_caps_the_text(tokenizer, text) -> None:
    res = perplexity(tiny_model("qwen3"), tokenizer, text, max_length=64, stride=32, max_tokens=100)
    assert res.text_tokens == 100 and res.tokens == 99


@pytest.mark.parametrize("kw", [{"stride": 64}, {"stride": 0}, {"max_length": 1}, {"batch_size": 0}, {"max_tokens": 1}])
def test_bad_options_raise(kw: dict, text) -> None:
    opts = {"max_length": 64, "stride": 32, **kw}
    with pytest.raises(LutqError):
        perplexity(tiny_model("qwen3"), tiny_tokenizer(), text, **opts)


def test_too_short_text_raises(tokenizer) -> None:
    with pytest.raises(LutqError, match="at least 2"):
        perplexity(tiny_model("qwen3"), tokenizer, "a", max_length=64, stride=32)


def test_lutq_checkpoint_uses_the_same_protocol(eval_dir, text) -> None:
    from lutq.models import load_model

    fp, _ = load_model(eval_dir / "fp")
    q2, tok = load_model(eval_dir / "q2")
    text = text[:600]
    a = perplexity(fp, tok, text, max_length=64, stride=32)
    b = perplexity(q2, tok, text, max_length=64, stride=32)
    assert a.tokens == b.tokens and a.windows == b.windows
    assert a.ppl != b.ppl and abs(math.log(a.ppl) - math.log(b.ppl)) < 0.5  # close but not the same model


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from lutq.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_takes_device_auto(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=2), tiny_tokenizer())
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    out = _cli(
        "eval",
        "ppl",
        "-m",
        str(tmp_path / "fp"),
        "-t",
        str(text),
        "--max-length",
        "32",
        "--stride",
        "16",
        "--device",
        "auto",
    )
    assert "ppl" in out
    with pytest.raises(LutqError, match="unknown device 'gpu0'"):
        _cli("eval", "ppl", "-m", str(tmp_path / "fp"), "-t", str(text), "--device", "gpu0")
