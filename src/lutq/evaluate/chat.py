"""Talking to a model: chat template (thinking on/off where the template supports it), greedy or sampled
generation, streamed output. `generate_reply` is what `lutq chat` and the tests use."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError


@dataclass
class ChatConfig(ConfigBase):
    """Generation settings. `thinking=None` keeps the template's default; True/False passes
    `enable_thinking` to templates that know it (Qwen3) and is ignored by others."""

    max_new_tokens: int = 512
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    thinking: bool | None = None
    system: str | None = None
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise LutqError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # written as `not (x > 0)` so that NaN (which `--temperature nan` parses to) is refused too
        if not self.greedy and not 0 < self.temperature < math.inf:
            raise LutqError(
                f"temperature must be > 0 and finite when sampling (or use --greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise LutqError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise LutqError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")


def supports_thinking(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template reacts to `enable_thinking`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "enable_thinking" in template


def build_prompt(tokenizer: Any, messages: list[dict[str, str]], cfg: ChatConfig) -> list[int]:
    """Token ids of the conversation plus the assistant generation prompt (system message from cfg
    prepended unless the conversation has one)."""
    if cfg.system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": cfg.system}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return tokenizer(text)["input_ids"]
    kw: dict[str, Any] = {}
    if cfg.thinking is not None and supports_thinking(tokenizer):
        kw["enable_thinking"] = cfg.thinking
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    if hasattr(out, "keys") and "input_ids" in out:  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


@torch.no_grad()
def generate_reply(
    model: torch.nn.Module,
    tokenizer: Any,
    messages: list[dict[str, str]],
    cfg: ChatConfig | None = None,
    *,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate the assistant's reply to `messages` ([{role, content}]); `on_text` receives it streamed."""
    cfg = cfg or ChatConfig()
    cfg.validate()
    if not messages:
        raise LutqError("generate_reply: no messages")
    device = next(model.parameters()).device
    prompt = torch.tensor([build_prompt(tokenizer, messages, cfg)], device=device)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    sampling: dict[str, Any] = (
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if cfg.greedy
        else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=cfg.max_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        eos_token_id=_stop_ids(model, tokenizer),
        pad_token_id=pad,
        streamer=_streamer(tokenizer, on_text) if on_text else None,
        **sampling,
    )
    return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
