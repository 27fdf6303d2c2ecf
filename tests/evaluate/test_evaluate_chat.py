"""Chat: prompts with thinking on/off, greedy/sampled generation, streaming, LUT models, the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.evaluate import ChatConfig, build_prompt, generate_reply, supports_thinking
from lutq.testing import tiny_model

MSG = [{"role": "user", "content": "hello there"}]


def test_thinking_switch_follows_the_template(tokenizer) -> None:
    assert supports_thinking(tokenizer)
    off = tokenizer.decode(build_prompt(tokenizer, MSG, ChatConfig(thinking=False)))
    on = tokenizer.decode(build_prompt(tokenizer, MSG, ChatConfig(thinking=True)))
    default = tokenizer.decode(build_prompt(tokenizer, MSG, ChatConfig()))
    assert off.endswith("<think>\n\n</think>") and "<think>" not in on and default == on
    assert on.startswith("<|im_start|>user\nhello there<|im_end|>")


def test_system_message_is_prepended(tokenizer) -> None:
    text = tokenizer.decode(build_prompt(tokenizer, MSG, ChatConfig(system="be brief")))
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_template_without_thinking_ignores_the_switch(tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    assert not supports_thinking(tok)
    assert build_prompt(tok, MSG, ChatConfig(thinking=False)) == build_prompt(tok, MSG, ChatConfig(thinking=True))


def test_greedy_reply_streams_and_equals_argmax_decoding(tokenizer) -> None:
    model = tiny_model("qwen3")
    cfg = ChatConfig(greedy=True, max_new_tokens=10, repetition_penalty=1.0)
    pieces: list[str] = []
    reply = generate_reply(model, tokenizer, MSG, cfg, on_text=pieces.append)
    assert reply and "".join(pieces).strip() == reply
    ids = torch.tensor([build_prompt(tokenizer, MSG, cfg)])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert reply == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_sampling_respects_seed_and_max_tokens(tokenizer) -> None:
    model = tiny_model("llama")
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cfg = ChatConfig(max_new_tokens=7, temperature=1.5, top_p=0.95, seed=3)
    a = generate_reply(model, tokenizer, MSG, cfg)
    assert 1 <= len(calls) <= 7  # one forward per generated token (KV cache)
    assert generate_reply(model, tokenizer, MSG, cfg) == a
    assert generate_reply(model, tokenizer, MSG, cfg.replace(seed=4, max_new_tokens=30)) != a


@pytest.mark.parametrize("snap", [False, True])
def test_lut_models_chat(tokenizer, snap: bool) -> None:
    from lutq.quant import quantize, snap_model

    model = tiny_model("gemma3")
    quantize(model, "q4a4", progress=False)
    if snap:
        snap_model(model)
    assert isinstance(generate_reply(model, tokenizer, MSG, ChatConfig(greedy=True, max_new_tokens=5)), str)


@pytest.mark.parametrize(
    "kw", [{"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"repetition_penalty": 0.0}]
)
def test_bad_config_raises(tokenizer, kw: dict) -> None:
    with pytest.raises(LutqError):
        generate_reply(tiny_model("qwen3"), tokenizer, MSG, ChatConfig(**kw))


def test_chat_cli_one_shot_and_interactive(eval_dir) -> None:
    from lutq.cli import app

    runner = CliRunner()
    one = runner.invoke(
        app,
        [
            "chat",
            "--model",
            str(eval_dir / "q2"),
            "--prompt",
            "hi",
            "--greedy",
            "--max-new-tokens",
            "6",
            "--no-thinking",
        ],
    )
    assert one.exit_code == 0, one.output
    loop = runner.invoke(
        app,
        ["chat", "--model", str(eval_dir / "fp"), "--greedy", "--max-new-tokens", "4"],
        input="hello\n/reset\nagain\n\n",
    )
    assert loop.exit_code == 0, loop.output


@pytest.mark.slow
def test_teacher_knows_the_capital_of_france(teacher) -> None:
    model, tok = teacher
    reply = generate_reply(
        model,
        tok,
        [{"role": "user", "content": "What is the capital of France?"}],
        ChatConfig(greedy=True, max_new_tokens=12),
    )
    assert "Paris" in reply
