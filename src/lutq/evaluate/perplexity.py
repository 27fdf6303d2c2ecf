"""Sliding-window perplexity (the HF "perplexity of fixed-length models" protocol), batched and exact.

Protocol (the same for FP models and lutq checkpoints, so the numbers compare):

1. Text: documents are joined with "\\n\\n" into one string and tokenized once with the tokenizer's
   defaults (a BOS token, if the tokenizer adds one, appears only at the very start). `max_tokens`
   keeps the first that many tokens.
2. Windows start at 0, stride, 2·stride, ...; each is at most `max_length` tokens long and the last one
   ends at the end of the text. A window scores only the tokens after the previous window's end, so every
   token after the first is predicted exactly once, with at least max_length − stride tokens of context
   (except in the first window).
3. PPL = exp(Σ NLL / number of predicted tokens); the NLL is computed in float32 from the model's logits.
4. Each window's scored tokens are a segment; the per-segment NLL sums give the 95 % interval of the
   perplexity (`lutq.evaluate.uncertainty`) and let two models scored on the same tokens be compared paired.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lutq.core.configs import ConfigBase
from lutq.core.console import progress
from lutq.core.errors import LutqError
from lutq.evaluate.uncertainty import LEVEL, ppl_interval

DOCUMENT_SEPARATOR = "\n\n"


@dataclass
class PplConfig(ConfigBase):
    """Options of `perplexity`: window length, stride, windows per forward, token cap."""

    max_length: int = 1024
    stride: int = 512
    batch_size: int = 4
    max_tokens: int | None = None

    def validate(self) -> None:
        if self.max_length < 2:
            raise LutqError(f"max_length must be >= 2, got {self.max_length}")
        if not 1 <= self.stride < self.max_length:
            # windows must overlap by >= 1 token, or the first token of each window would go unscored
            raise LutqError(f"stride must be in [1, max_length-1={self.max_length - 1}], got {self.stride}")
        if self.batch_size < 1:
            raise LutqError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise LutqError(f"max_tokens must be >= 2, got {self.max_tokens}")


@dataclass
class PplResult:
    """Perplexity and what it was computed on. `nll` is the mean NLL per predicted token (nats);
    `ppl_low` / `ppl_high` its 95 % interval over the windows' scored segments (None for one window);
    `segment_nll` / `segment_tokens` the per-window sums it comes from; `ids_sha256` names the token ids."""

    ppl: float
    nll: float
    tokens: int
    nll_sum: float
    windows: int
    text_tokens: int
    max_length: int
    stride: int
    ppl_low: float | None = None
    ppl_high: float | None = None
    segment_nll: list[float] = field(default_factory=list)
    segment_tokens: list[int] = field(default_factory=list)
    ids_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def segments(self) -> dict[str, Any]:
        """The per-window sums a paired comparison needs: {nll, tokens, ids_sha256}."""
        return {"nll": self.segment_nll, "tokens": self.segment_tokens, "ids_sha256": self.ids_sha256}

    def interval_text(self) -> str:
        """'95 % CI 27.9-30.2 over 16 windows', or a note that one window gives no interval."""
        if self.ppl_low is None or self.ppl_high is None:
            return "no interval from one window"
        return f"{LEVEL:.0%} CI {self.ppl_low:.4g}-{self.ppl_high:.4g} over {self.windows} windows"


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; the last `targets` of them are scored."""

    begin: int
    end: int
    targets: int


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The sliding windows over `n_tokens` tokens; their `targets` sum to n_tokens − 1."""
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        targets = end - prev_end if begin > 0 else end - 1
        out.append(Window(begin, end, targets))
        prev_end = end
        if end == n_tokens:
            break
    return out


def join_documents(text_or_documents: str | Sequence[Any], tokenizer: Any = None) -> str:
    """One string from a string, a list of strings, or a list of lutq Documents (chat documents are
    rendered with the tokenizer's chat template), joined with DOCUMENT_SEPARATOR."""
    if isinstance(text_or_documents, str):
        return text_or_documents
    parts: list[str] = []
    for d in text_or_documents:
        if isinstance(d, str):
            parts.append(d)
        elif getattr(d, "text", ""):
            parts.append(d.text)
        elif getattr(d, "messages", None):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise LutqError(f"document {d.id!r} is a chat; the tokenizer has no chat template to render it")
            parts.append(tokenizer.apply_chat_template(d.messages, tokenize=False))
    return DOCUMENT_SEPARATOR.join(p for p in parts if p)


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [N] (long) of `text`, tokenized once with the tokenizer's defaults, capped at max_tokens."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _batches(wins: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most batch_size per batch (no padding needed)."""
    batch: list[Window] = []
    for w in wins:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, batch: list[Window]) -> list[float]:
    """Summed NLL of each window's scored tokens, for equal-length windows computed in one forward."""
    x = torch.stack([ids[w.begin : w.end] for w in batch]).to(_model_device(model))
    keep = max(w.targets for w in batch)  # logits at positions L-1-keep .. L-2 predict the scored tokens
    logits = model(input_ids=x, use_cache=False, logits_to_keep=keep + 1).logits[:, :-1].float()
    return [
        F.cross_entropy(logits[row, keep - w.targets :], x[row, -w.targets :], reduction="sum").item()
        for row, w in enumerate(batch)
    ]


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_documents: str | Sequence[Any],
    *,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> PplResult:
    """Sliding-window perplexity of `model` on a text, a list of texts, or lutq Documents (module docstring)."""
    cfg = PplConfig(max_length=max_length, stride=stride, batch_size=batch_size, max_tokens=max_tokens)
    cfg.validate()
    if device is not None:
        model = model.to(device)
    if tokenizer is None:
        raise LutqError("perplexity: the model has no tokenizer (a checkpoint saved without tokenizer files?)")
    ids = tokenize_text(tokenizer, join_documents(text_or_documents, tokenizer), max_tokens)
    if ids.numel() < 2:
        raise LutqError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise LutqError(
            f"the tokenizer ({tokenizer.name_or_path or 'unnamed'}) gives token id {int(ids.max())}, "
            f"but the model's vocabulary has {vocab} entries: tokenizer and model do not match"
        )
    wins = windows(ids.numel(), max_length, stride)
    was_training = model.training
    model.eval()
    segment_nll: list[float] = []
    try:
        with progress(transient=True) as bar:
            task = bar.add_task("perplexity", total=len(wins), visible=show_progress)
            for batch in _batches(wins, batch_size):
                segment_nll += window_nll(model, ids, batch)
                bar.advance(task, len(batch))
    finally:
        model.train(was_training)
    segment_tokens = [w.targets for w in wins]
    tokens, nll_sum = sum(segment_tokens), math.fsum(segment_nll)
    nll = nll_sum / tokens
    interval = ppl_interval(segment_nll, segment_tokens)
    return PplResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=tokens,
        nll_sum=nll_sum,
        windows=len(wins),
        text_tokens=ids.numel(),
        max_length=max_length,
        stride=stride,
        ppl_low=interval and interval[0],
        ppl_high=interval and interval[1],
        segment_nll=segment_nll,
        segment_tokens=segment_tokens,
        ids_sha256=hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
    )
