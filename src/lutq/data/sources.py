"""Where KD documents come from: fetched corpus assets, `.txt` files or directories, `.json` / `.jsonl`
records (plain text, ShareGPT, chat messages or Alpaca, detected per record) and `hf:NAME[:split]`.

Every source yields `lutq.assets.Document`s; the held-out split is always by whole documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lutq.assets.corpora import SPLITS, Document, normalize_conversation, split_documents
from lutq.core.errors import LutqError
from lutq.core.hub import hub_offline, hub_unreachable, offline_hub

DEFAULT_VAL_FRACTION = 0.05


def load_documents(spec: str, *, val_fraction: float = DEFAULT_VAL_FRACTION) -> list[Document]:
    """Documents of `spec`: an asset (`sharegpt`, `bible:val`), a `.txt` file or a directory of them
    (one document per file), a `.json` / `.jsonl` file, or `hf:NAME[:split]` (needs `datasets`).

    A file or directory spec may end in `:train` / `:val` to take one side of the stable held-out split
    (`val_fraction` of whole documents); an asset uses its own split.
    """
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    base, split = _split_suffix(spec)
    path = Path(base).expanduser()
    if path.exists():
        docs = _path_documents(path)
        return split_documents(docs, val_fraction)[split] if split else docs
    from lutq.assets import load_documents as load_asset_documents
    from lutq.assets.registry import ASSETS

    if base in ASSETS:
        return load_asset_documents(spec)
    raise LutqError(
        f"unknown data source {spec!r}: not an existing file or directory, not an asset "
        f"({', '.join(n for n, a in ASSETS.items() if a.kind != 'model')}), not hf:NAME"
    )


def document_splits(spec: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, list[Document]]:
    """{'train': [...], 'val': [...]} for a source: an asset's own held-out files when it has them,
    otherwise `lutq.assets.corpora.split_documents` (stable hash of the document id)."""
    from lutq.assets.registry import ASSETS

    if spec in ASSETS and ASSETS[spec].kind != "model":
        split = {s: load_documents(f"{spec}:{s}") for s in SPLITS}
        if split["val"] or val_fraction == 0:
            return split
        return split_documents(split["train"], val_fraction)
    return split_documents(load_documents(spec), val_fraction)


def one_or_mix(specs: list[str] | None) -> str | list[str] | None:
    """A repeatable `--source` / `--calib` option: given once, one source (recorded as a string); several, an even
    mix (a list); none, None."""
    return None if not specs else specs[0] if len(specs) == 1 else list(specs)


def source_name(spec: str) -> str:
    """A short file-name-safe name for a source: 'sharegpt', 'notes' for notes.jsonl, 'alpaca' for
    hf:tatsu-lab/alpaca."""
    if spec.startswith("hf:"):
        name = spec[3:].split(":")[0].rsplit("/", 1)[-1]
    else:
        base = _split_suffix(spec)[0]
        path = Path(base)
        name = path.stem if path.suffix else path.name
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "data"


def _split_suffix(spec: str) -> tuple[str, str | None]:
    base, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS:
        return base, tail
    return spec, None


# --- files ----------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LutqError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from e


def _path_documents(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise LutqError(f"{path}: directory holds no .txt files")
        return [Document(id=str(p.relative_to(path)), text=_read_text(p)) for p in files]
    if path.suffix == ".txt":
        return [Document(id=path.name, text=_read_text(path))]
    if path.suffix == ".jsonl":
        return list(records_to_documents(_jsonl_records(path), path.name))
    if path.suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise LutqError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise LutqError(f"{path}: expected a JSON array of records (or an object holding one)")
            data = lists[0]
        if not isinstance(data, list):
            raise LutqError(f"{path}: expected a JSON array of records")
        return list(records_to_documents(((f"{path}[{i}]", r) for i, r in enumerate(data)), path.name))
    raise LutqError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .json, .jsonl or a directory")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LutqError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from e
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise LutqError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def records_to_documents(records: Iterable[tuple[str, Any]], prefix: str) -> Iterator[Document]:
    """(where, record) pairs -> Documents with the record's `id` or `{prefix}:{index}`; records that
    normalize to an empty conversation are skipped."""
    for i, (where, rec) in enumerate(records):
        doc = record_to_document(rec, where, default_id=f"{prefix}:{i}")
        if doc.text or doc.messages:
            yield doc


def record_to_document(rec: Any, where: str, default_id: str | None = None) -> Document:
    """One record, format detected from its keys: `conversations` (ShareGPT from/value), `messages`
    (role/content), `instruction` [+ `input`] + `output` (Alpaca), or `text`."""
    if not isinstance(rec, dict):
        raise LutqError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    doc_id = str(rec.get("id") or default_id or where)
    for key in ("conversations", "messages"):
        if isinstance(rec.get(key), list):
            return Document(id=doc_id, messages=normalize_conversation(rec[key]))
    if "instruction" in rec and "output" in rec:
        prompt = str(rec["instruction"])
        if rec.get("input"):
            prompt += "\n\n" + str(rec["input"])
        return Document(
            id=doc_id,
            messages=normalize_conversation(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(rec["output"])}]
            ),
        )
    if isinstance(rec.get("text"), str):
        return Document(id=doc_id, text=rec["text"])
    raise LutqError(
        f"{where}: unrecognized record with keys {sorted(rec)}; expected conversations "
        "(ShareGPT), messages (chat), instruction/input/output (Alpaca) or text"
    )


# --- Hugging Face datasets ------------------------------------------------------------------------


def _hf_documents(spec: str) -> list[Document]:
    name, _, split = spec[3:].partition(":")
    if not name:
        raise LutqError(f"data source {spec!r}: expected hf:NAME[:split]")
    try:
        import datasets
    except ImportError:
        raise LutqError(f"data source {spec!r} needs the `datasets` package (pip install datasets)") from None
    # Without the hub, datasets retries for ~25 s before it looks in its cache: ask once (3 s) and, when the hub
    # cannot be reached, load in offline mode (the local cache, or a clear error at once).
    unreachable = None if hub_offline() else hub_unreachable()
    try:
        with offline_hub(getattr(datasets, "config", None)) if unreachable else nullcontext():
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, unknown name, bad split: one clear line
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        if unreachable:
            reason += f" (the hub is unreachable: {unreachable}; only the local datasets cache was searched)"
        raise LutqError(f"cannot load {spec!r} with datasets: {reason}") from e
    return list(records_to_documents(((f"{spec}[{i}]", r) for i, r in enumerate(ds)), name))
