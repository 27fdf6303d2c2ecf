"""One table for several models on the same data: perplexity per text, KD metrics against a cache,
size and bits per weight — the table users paste into a model card (markdown) or keep (JSON)."""

from __future__ import annotations

import datetime
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lutq.core.configs import ConfigBase
from lutq.core.console import console
from lutq.core.errors import LutqError
from lutq.core.labels import distinct_labels
from lutq.evaluate.uncertainty import (
    LEVEL,
    format_change,
    format_diff,
    mean_interval,
    paired_mean_diff,
    paired_ppl_ratio,
)


@dataclass
class CompareConfig(ConfigBase):
    """Options of `compare`: the perplexity protocol (see `lutq.evaluate.perplexity`), the KD evaluation,
    and where the models run."""

    max_length: int = 1024
    stride: int = 512
    batch_size: int = 4
    max_tokens: int | None = None
    kd_split: str = "val"
    kd_batch_size: int = 8
    kd_max_batches: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    reference: str | None = None  # the row (label or model spec) the others are paired against; None: the first


@dataclass
class CompareResult:
    """Rows (one per model: label, model spec, size, ppl per text with its interval and segments, KD metrics with
    their intervals, and the paired changes against the reference row) plus what produced them."""

    entries: list[dict[str, Any]]
    texts: list[str]
    cache: str | None
    config: CompareConfig
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def rows(self) -> list[dict[str, Any]]:
        return self.entries

    @property
    def reference(self) -> dict[str, Any] | None:
        """The row the others are paired against."""
        return self.entries[reference_index(self.entries, self.config.reference)] if self.entries else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "texts": self.texts,
            "cache": self.cache,
            "reference": self.reference and self.reference["label"],
            "config": self.config.to_dict(),
            "rows": self.entries,
        }

    def markdown(self) -> str:
        """A GitHub markdown table (one row per model) and a line saying how it was measured."""
        has_kd = any(r["kd"] for r in self.entries)
        has_full = any("full_kl" in (r["kd"] or {}) for r in self.entries)  # caches with teacher_lse
        head = ["model", "size (MB)", "bits/weight", "LUT bits/weight", *[f"ppl {t}" for t in self.texts]]
        if has_kd:
            head += ["KD loss", "KL", *(["full-vocab KL"] if has_full else []), "top-1 agree"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for r in self.entries:
            lut = r["size"]["lut"]
            cells = [
                r["label"],
                _fmt(r["size"]["total"]["size_mb"], 2),
                _fmt(r["size"]["total"]["bits_per_weight"], 2),
                _fmt(lut and lut["bits_per_weight"], 3),
                *[_fmt(r["ppl"].get(t), 3) for t in self.texts],
            ]
            if has_kd:
                kd = r["kd"] or {}
                cells += [
                    _fmt(kd.get("kd"), 4),
                    _fmt(kd.get("kl"), 4),
                    *([_fmt(kd.get("full_kl"), 4)] if has_full else []),
                    _fmt(kd.get("top1_agree"), 4),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += self._paired_markdown() + self._kd_interval_markdown() + self._kd_source_markdown()
        c = self.config
        note = (
            f"Perplexity: sliding window {c.max_length}/{c.stride}"
            + (f", first {c.max_tokens} tokens per text" if c.max_tokens else "")
            + (f"; KD metrics on {self.cache} ({c.kd_split} split)" if self.cache else "")
            + f"; lutq eval compare, {self.date}."
        )
        return "\n".join(lines) + "\n\n" + note + "\n"

    def _paired_markdown(self) -> list[str]:
        """Lines of a second table: each model against the reference row, paired on the same tokens (perplexity
        change) and the same KD units (KD loss and top-1 differences)."""
        ref = self.reference
        if ref is None or len(self.entries) < 2:
            return []
        kd = any(r.get("kd_vs_ref") for r in self.entries)
        if not self.texts and not kd:
            return []
        head = [f"ppl {t}" for t in self.texts] + (["KD loss", "top-1 agree"] if kd else [])
        lines = [
            "",
            f"Against {ref['label']}, paired ({LEVEL:.0%} intervals, `lutq.evaluate.uncertainty`): perplexity change "
            "on the same tokens (the windows' scored segments as units)"
            + (f", KD loss and top-1 agreement differences on the same validation {self._kd_units()}" if kd else "")
            + ":",
            "",
            "| model | " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(head),
        ]
        for r in self.entries:
            if r is ref:
                continue
            cells = []
            for t in self.texts:
                p = (r.get("ppl_vs_ref") or {}).get(t)
                cells.append("- (other tokens)" if p is None else format_paired(p))
            if kd:
                cells += [format_paired((r.get("kd_vs_ref") or {}).get(k)) for k in ("kd", "top1_agree")]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return lines

    def _kd_units(self, row: Mapping[str, Any] | None = None) -> str:
        row = row or next((r for r in self.entries if r.get("kd_units")), {})
        return _kd_units_text(row, self.config.kd_batch_size)

    def _kd_interval_markdown(self) -> list[str]:
        """Lines of a table of the KD loss and top-1 agreement with their intervals over the KD units."""
        rows = [r for r in self.entries if r.get("kd_ci")]
        if not rows:
            return []
        lines = [
            "",
            f"KD loss and top-1 agreement with their {LEVEL:.0%} interval over the cache's {self.config.kd_split} "
            f"{self._kd_units(rows[0])}:",
            "",
            "| model | KD loss | top-1 agree |",
            "|---|---:|---:|",
        ]
        for r in rows:
            cells = []
            for k in ("kd", "top1_agree"):
                ci = r["kd_ci"].get(k)
                cells.append(_fmt(r["kd"].get(k), 4) + ("" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"))
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return lines

    def _kd_source_markdown(self) -> list[str]:
        """Lines of a table of the KD loss and top-1 agreement on each source of a mixed cache's split."""
        rows = [r for r in self.entries if (r["kd"] or {}).get("by_source")]
        if not rows:
            return []
        from lutq.data import source_name

        sources = list(rows[0]["kd"]["by_source"])
        head = [f"{k} {source_name(s)}" for s in sources for k in ("KD", "top-1")]
        lines = [
            "",
            f"KD loss and top-1 agreement on each source of the cache's {self.config.kd_split} split:",
            "",
            "| model | " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(head),
        ]
        for r in rows:
            by = r["kd"]["by_source"]
            cells = [_fmt(by.get(s, {}).get(k), 4) for s in sources for k in ("kd", "top1_agree")]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return lines


def _kd_units_text(row: Mapping[str, Any], batch_size: int) -> str:
    """'documents (144 units; ...)' or 'batches (18 of 8 sequences)': what a row's KD intervals are taken over."""
    n = len((row.get("kd_units") or {}).get("n", []))
    if row.get("kd_unit") == "document":
        return f"documents ({n} units; a conversation's sequences are not independent)"
    return f"batches ({n} of {batch_size} sequences)"


def reference_index(entries: Sequence[dict[str, Any]], reference: str | None) -> int:
    """Index of the row named `reference` (its label, or its model spec); 0 when None."""
    if reference is None:
        return 0
    for i, r in enumerate(entries):
        if reference in (r["label"], r["model"]):
            return i
    raise LutqError(f"compare: reference {reference!r} is none of the models (labels: {[r['label'] for r in entries]})")


def add_paired(entries: list[dict[str, Any]], texts: Sequence[str], reference: str | None = None) -> None:
    """Give every row but the reference `ppl_vs_ref`: {text: {ratio, low, high}} of its perplexity over the
    reference's, paired on the same segments (None for a text the two scored on different tokens), and, when both
    have KD metrics on the same batches, `kd_vs_ref`: {metric: {diff, low, high}}."""
    if not entries:
        return
    ref = entries[reference_index(entries, reference)]
    for row in entries:
        if row is ref:
            continue
        row["ppl_vs_ref"], kd = paired_changes(ref, row, texts)
        if kd is not None:
            row["kd_vs_ref"] = kd


def paired_changes(
    ref: Mapping[str, Any], row: Mapping[str, Any], texts: Sequence[str]
) -> tuple[dict[str, dict[str, float | None] | None], dict[str, dict[str, float | None]] | None]:
    """(ppl changes, KD differences) of `row` against `ref`, paired unit by unit. Both are evaluation records with
    `ppl_segments` {text: {nll, tokens, ids_sha256}} and / or `kd_units` {n: [...], metric: [...]} (with
    `kd_unit`, `kd_ids_sha256`): a text is paired only when both scored the same token ids ({ratio, low, high},
    else None), the KD metrics only when both scored the same ids in the same units ({metric: {diff, low, high}},
    else None)."""
    ppl: dict[str, dict[str, float | None] | None] = {}
    for t in texts:
        a, b = ref.get("ppl_segments", {}).get(t), row.get("ppl_segments", {}).get(t)
        same = a and b and a["ids_sha256"] == b["ids_sha256"] and a["tokens"] == b["tokens"]
        if not same:
            ppl[t] = None
            continue
        ratio, low, high = paired_ppl_ratio(a["nll"], b["nll"], a["tokens"])
        ppl[t] = {"ratio": ratio, "low": low, "high": high}
    ka, kb = ref.get("kd_units"), row.get("kd_units")
    same = ka and kb and ka["n"] == kb["n"] and ref.get("kd_unit") == row.get("kd_unit")
    if not same or ref.get("kd_ids_sha256") != row.get("kd_ids_sha256"):
        return ppl, None
    kd: dict[str, dict[str, float | None]] = {}
    for k in sorted(ka.keys() & kb.keys() - {"n"}):
        diff, low, high = paired_mean_diff(ka[k], kb[k], ka["n"])
        kd[k] = {"diff": diff, "low": low, "high": high}
    return ppl, kd


def format_paired(change: Mapping[str, float | None] | None) -> str:
    """A `paired_changes` entry as a table cell: '-0.0171 [-0.0226, -0.0150]' (a difference), '+11.4 % [+9.2,
    +13.7]' (a perplexity ratio), '-' for none."""
    if not change:
        return "-"
    if "ratio" in change:
        return format_change(change["ratio"], change["low"], change["high"])  # type: ignore[arg-type]
    return format_diff(change["diff"], change["low"], change["high"])  # type: ignore[arg-type]


def kd_intervals(columns: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float] | None]:
    """{metric: 95 % interval} of `unit_columns` (each unit's sums and token count `n`)."""
    return {k: mean_interval(v, columns["n"]) for k, v in columns.items() if k != "n"}


def unit_columns(units: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """`evaluate_kd(per_unit=...)`'s rows as columns: {n: [tokens per unit], metric: [sum per unit]}."""
    metrics = [k for k in (units[0] if units else {}) if k != "n"]
    return {"n": [int(u["n"]) for u in units], **{k: [u[k] for u in units] for k in metrics}}


def model_labels(specs: Sequence[str]) -> dict[str, str]:
    """{label: spec}, one short distinct label per spec (lutq.core.labels.distinct_labels)."""
    return dict(zip(distinct_labels(specs), specs, strict=True))


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def load_text(spec: str) -> list[Any]:
    """Documents of a `--text` spec (FILE | ASSET[:split] | hf:NAME), refusing an empty source."""
    from lutq.data import load_documents

    docs = load_documents(spec)
    if not docs:
        raise LutqError(f"text {spec!r}: no documents")
    return docs


def evaluate_model(
    model: Any, tokenizer: Any, texts: Mapping[str, list[Any]], cfg: CompareConfig, cache: Any = None
) -> dict[str, Any]:
    """Size, perplexity per text and KD metrics (when a KDCache is given) of a loaded model."""
    from lutq.evaluate.perplexity import perplexity
    from lutq.evaluate.size import model_size

    if cache is not None:  # a student the cache cannot score fails before minutes of perplexity, not after
        cache.check_tokenizer(tokenizer, model)
    size = model_size(model)
    row: dict[str, Any] = {"size": size, "ppl": {}, "ppl_ci": {}, "ppl_tokens": {}, "ppl_segments": {}, "kd": None}
    for name, docs in texts.items():
        r = perplexity(
            model,
            tokenizer,
            docs,
            max_length=cfg.max_length,
            stride=cfg.stride,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
        )
        row["ppl"][name] = r.ppl
        row["ppl_ci"][name] = None if r.ppl_low is None else [r.ppl_low, r.ppl_high]
        row["ppl_tokens"][name] = r.tokens
        row["ppl_segments"][name] = r.segments()
    if cache is not None:
        from lutq.kd import evaluate_kd
        from lutq.kd.loss import kd_unit

        units: list[dict[str, float]] = []
        row["kd"] = evaluate_kd(
            model,
            cache,
            split=cfg.kd_split,
            batch_size=cfg.kd_batch_size,
            max_batches=cfg.kd_max_batches,
            per_unit=units,
            by_source=True,
        )
        columns = row["kd_units"] = unit_columns(units)
        row["kd_unit"], row["kd_ids_sha256"] = kd_unit(cache, cfg.kd_split), row["kd"]["ids_sha256"]
        row["kd_ci"] = kd_intervals(columns)
    return row


def compare(
    models: Mapping[str, str] | Sequence[str],
    *,
    texts: Sequence[str] = (),
    cache: str | Path | None = None,
    **options: Any,
) -> CompareResult:
    """Evaluate models (specs, or {label: spec}) one at a time on the same texts / KD cache.

    `options` are CompareConfig fields (max_length, stride, batch_size, max_tokens, kd_max_batches, device, ...).
    """
    from lutq.models import load_model

    cfg = CompareConfig.from_dict(options, source="compare options")
    labelled = dict(models) if isinstance(models, Mapping) else model_labels([str(m) for m in models])
    if not labelled:
        raise LutqError("compare: no models given")
    if not texts and not cache:
        raise LutqError("compare: nothing to measure; give texts (--text) and/or a KD cache (--cache)")
    if texts:  # bad window options fail before the first model loads
        from lutq.evaluate.perplexity import PplConfig

        PplConfig(
            max_length=cfg.max_length, stride=cfg.stride, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens
        ).validate()
    docs = {spec: load_text(spec) for spec in texts}
    kd_cache = None
    if cache:
        from lutq.kd import KDCache

        kd_cache = KDCache(cache)
    if cfg.reference is not None:  # a misspelt reference fails before any model loads
        reference_index([{"label": k, "model": str(v)} for k, v in labelled.items()], cfg.reference)
    entries = []
    for label, spec in labelled.items():
        console.print(f"[bold]evaluating[/] {label} ({spec})")
        model, tok = load_model(spec, dtype=cfg.dtype, device=cfg.device)
        entries.append({"label": label, "model": str(spec), **evaluate_model(model, tok, docs, cfg, kd_cache)})
        del model
        gc.collect()
    add_paired(entries, list(texts), cfg.reference)
    return CompareResult(entries, list(texts), str(cache) if cache else None, cfg)
