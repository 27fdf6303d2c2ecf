"""Documents -> token ids -> L-token blocks.

Chat is rendered with the tokenizer's own chat template the way Qwen3's template behaves:

- `on`:   `apply_chat_template(..., enable_thinking=True)` as is. Qwen3 renders a (possibly empty)
          `<think>\\n\\n</think>\\n\\n` block before the final answer whatever `enable_thinking` says,
          because the flag only steers the generation prompt.
- `off`:  `enable_thinking=False`, then every `<think>...</think>` block (and the whitespace after it)
          is removed from the rendering.
- `both`: two renderings per conversation, in the order [off, on].
- `none`: no template; the message contents joined by a blank line.

Templates that ignore `enable_thinking` (SmolLM2's) simply ignore it. Plain-text documents are
tokenized as they are, once, in every mode.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lutq.assets.corpora import Document
from lutq.core.errors import LutqError

THINKING_MODES = ("off", "on", "both", "none")
# A block holds no other "<think>": a literal "<think>" in a user's text (no closing tag) must not start a match
# that runs through the following turns to the next answer's "</think>".
_THINK_BLOCK = re.compile(r"<think>(?:(?!<think>).)*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove `<think>...</think>` blocks (the innermost `<think>` before each `</think>`) and the whitespace
    that follows each."""
    return _THINK_BLOCK.sub("", text)


def render_text(doc: Document, tokenizer: Any, thinking: str = "off") -> list[str]:
    """The text(s) a document becomes: one per rendering (two for chat with thinking='both')."""
    if thinking not in THINKING_MODES:
        raise LutqError(f"thinking mode {thinking!r}: choose one of {', '.join(THINKING_MODES)}")
    if not doc.messages:
        return [doc.text]
    if thinking == "none":
        return ["\n\n".join(m["content"] for m in doc.messages)]
    if not getattr(tokenizer, "chat_template", None):
        raise LutqError(
            f"document {doc.id!r} is a chat but the tokenizer has no chat template; use thinking='none' for raw text"
        )
    modes = {"off": [False], "on": [True], "both": [False, True]}[thinking]
    out = []
    for enable in modes:
        text = tokenizer.apply_chat_template(
            doc.messages, tokenize=False, add_generation_prompt=False, enable_thinking=enable
        )
        out.append(text if enable else strip_thinking(text))
    return out


def iter_render(
    documents: Iterable[Document],
    tokenizer: Any,
    thinking: str = "off",
    batch: int = 64,
    sources: list[int] | None = None,
) -> Iterator[list[int]]:
    """Lazily render and tokenize documents (no special tokens added), in batches for speed. `sources`, when
    given, receives each rendering's document index just before the rendering is yielded (`thinking="both"`
    gives two renderings of one document)."""
    pending: list[str] = []
    pending_docs: list[int] = []
    for i, doc in enumerate(documents):
        texts = render_text(doc, tokenizer, thinking)
        pending.extend(texts)
        pending_docs.extend([i] * len(texts))
        if len(pending) >= batch:
            yield from _tokenized(tokenizer, pending, pending_docs, sources)
            pending, pending_docs = [], []
    if pending:
        yield from _tokenized(tokenizer, pending, pending_docs, sources)


def _tokenized(tokenizer: Any, texts: list[str], docs: list[int], sources: list[int] | None) -> Iterator[list[int]]:
    for ids, doc in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], docs, strict=True):
        if sources is not None:
            sources.append(doc)
        yield ids


def render(documents: Iterable[Document], tokenizer: Any, thinking: str = "off") -> list[list[int]]:
    """Token ids per rendering: chat through the chat template (see the module doc), text as is."""
    return list(iter_render(documents, tokenizer, thinking))


def pack(
    token_lists: Iterable[list[int]],
    L: int,
    eos_id: int,
    max_blocks: int | None = None,
    block_docs: list[int] | None = None,
    doc_of: Sequence[int] | None = None,
) -> np.ndarray:
    """Concatenate renderings with `eos_id` after each and cut into blocks of exactly L tokens.

    No padding: documents run across block boundaries and the incomplete tail is dropped. Stops reading
    `token_lists` as soon as `max_blocks` blocks are full. Returns int32 [N, L]. `block_docs`, when given,
    receives for each block the index of the document its first token belongs to: the rendering's index in
    `token_lists`, or `doc_of[rendering]` (e.g. `iter_render`'s `sources`, filled as the renderings are read).
    """
    if L < 2:
        raise LutqError(f"block length L={L} must be at least 2")
    blocks: list[np.ndarray] = []
    buf: list[int] = []
    starts: list[tuple[int, int]] = []  # (offset in buf, document index) of each document that begins in buf
    done = 0
    if max_blocks == 0:
        return np.zeros((0, L), dtype=np.int32)
    for doc, ids in enumerate(token_lists):
        starts.append((len(buf), doc))
        buf.extend(ids)
        buf.append(eos_id)
        n = len(buf) // L
        if max_blocks is not None:
            n = min(n, max_blocks - done)
        if n:
            blocks.append(np.asarray(buf[: n * L], dtype=np.int32).reshape(n, L))
            if block_docs is not None:
                for b in range(n):
                    r = max(d for off, d in starts if off <= b * L)
                    block_docs.append(r if doc_of is None else doc_of[r])
            buf = buf[n * L :]
            owner = max(d for off, d in starts if off <= n * L)  # the document the remaining tokens begin in
            starts = [(0, owner)] + [(off - n * L, d) for off, d in starts if off > n * L]
            done += n
        if done == max_blocks:
            break
    return np.concatenate(blocks) if blocks else np.zeros((0, L), dtype=np.int32)


def spread(
    token_lists: Iterable[list[int]],
    L: int,
    eos_id: int,
    per_document: int,
    max_blocks: int | None = None,
    block_docs: list[int] | None = None,
    doc_of: Sequence[int] | None = None,
) -> np.ndarray:
    """Blocks of exactly L tokens cut within each rendering (then `eos_id`), at most `per_document` of them per
    document, evenly spread over the rendering; a held-out split made this way rests on many more independent
    documents than `pack`'s consecutive blocks. A rendering shorter than L gives none. Stops reading once
    `max_blocks` are full. Returns int32 [N, L]; `block_docs` and `doc_of` (several renderings of one document) as
    for `pack`."""
    if L < 2:
        raise LutqError(f"block length L={L} must be at least 2")
    if per_document < 1:
        raise LutqError(f"per_document={per_document} must be at least 1")
    blocks: list[np.ndarray] = []
    full = max_blocks == 0
    taken: dict[int, int] = {}
    for r, ids in enumerate([] if full else token_lists):
        doc = r if doc_of is None else doc_of[r]
        stream = [*ids, eos_id]
        k = len(stream) // L
        take = min(per_document - taken.get(doc, 0), k)
        taken[doc] = taken.get(doc, 0) + take
        for i in range(take):
            b = (2 * i + 1) * k // (2 * take)  # the centre of the i-th of `take` equal parts
            blocks.append(np.asarray(stream[b * L : (b + 1) * L], dtype=np.int32))
            if block_docs is not None:
                block_docs.append(doc)
            if full := max_blocks is not None and len(blocks) >= max_blocks:
                break
        if full:
            break
    return np.stack(blocks) if blocks else np.zeros((0, L), dtype=np.int32)


def mix_shares(n: int, weights: Sequence[float]) -> list[int]:
    """n items shared in proportion to `weights` (largest remainders get the leftovers, the first ones on a tie):
    with equal weights an even mix, the first n % k taking one more."""
    total = float(sum(weights))
    if not weights or total <= 0 or min(weights) < 0:
        raise LutqError(f"mix weights {list(weights)} must be non-negative and not all zero")
    exact = [n * w / total for w in weights]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    return shares


def spread_or_pack(
    documents: Sequence[Any],
    tokenizer: Any,
    num_blocks: int,
    L: int,
    thinking: str = "off",
    block_docs: list[int] | None = None,
) -> np.ndarray:
    """`num_blocks` blocks of L tokens spread over as many of `documents` as possible (a few from each, evenly
    placed within it: not the first pages of the first document), or packed back to back when the documents are
    too short for that to fill them. For samples of long texts (books, plays, manuals): calibration and the text
    sources of a mixed KD cache. `block_docs` as for `pack` (indices into `documents`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LutqError("the tokenizer has no EOS token to separate documents")
    per_document = -(-num_blocks // max(len(documents), 1))
    spread_docs: list[int] = []
    blocks = spread(
        iter_render(documents, tokenizer, thinking), L, int(eos), per_document, num_blocks, block_docs=spread_docs
    )
    packed_docs: list[int] = []
    if len(blocks) < num_blocks:
        packed = pack(iter_render(documents, tokenizer, thinking), L, int(eos), num_blocks, block_docs=packed_docs)
        if len(packed) > len(blocks):
            blocks, spread_docs = packed, packed_docs
    if block_docs is not None:
        block_docs.extend(spread_docs)
    return blocks


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary, the special tokens and the chat template: equal fingerprints mean a
    student can learn from a teacher's token ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
        "eos": tokenizer.eos_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()
