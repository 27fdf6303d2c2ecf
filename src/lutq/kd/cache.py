"""`lutq cache`: run the teacher over packed L-token blocks and store its top-K logits (plus optional
random negatives) per next-token position, in shards that are written atomically one by one.

Resumable: the plan (settings + a hash of every input block) goes to `progress.json` before any shard;
a shard that exists on disk is done, so a re-run after a kill writes only the missing ones and the
result is byte-identical to an uninterrupted run (batches never straddle shards, and the negatives of
a sequence come from an RNG seeded by (seed, split, sequence index) alone, on the teacher's device).
`meta.json` is written last (with every shard's sha256); a directory without it is an unfinished cache.

Several processes (torchrun): rank r writes shards r, r + W, r + 2W, ... of the same plan; rank 0
writes meta.json after a barrier, so the directory reads exactly like a single-process cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lutq.core import ConfigBase, LutqError, atomic_write_json, console, lutq_home, progress, sha256_file
from lutq.core.atomic import check_replaceable, remove_stale_scratch_in
from lutq.core.device import resolve_device
from lutq.core.digest import spaced_indices
from lutq.core.formats import read_json
from lutq.kd.shards import (
    ARRAY_DTYPES,
    BUILD_LOG,
    FORMAT,
    FORMAT_VERSION,
    META,
    PROGRESS,
    check_shard,
    open_shard,
    shard_file,
    write_shard,
)

SPLITS = ("train", "val")


@dataclass
class CacheConfig(ConfigBase):
    """Settings of a KD cache. L = seq_len, K = top_k, R = negatives (random ids per position)."""

    model: str = "smollm2-135m-instruct"  # teacher: asset name, HF/lutq directory, .gguf, hub id
    # lutq.data.load_documents spec (asset, file, directory, hf:NAME), or a list of them: a mix (make_plan)
    source: str | list[str] = "sharegpt"
    source_weights: list[float] | None = None  # a mix's shares, in proportion (None: even)
    thinking: str = "off"  # chat rendering: off | on | both | none
    seq_len: int = 128
    top_k: int = 64
    negatives: int = 0
    num_sequences: int = 1000  # train + val blocks
    max_tokens: int | None = None  # alternative to num_sequences: max_tokens // seq_len blocks
    val_fraction: float = 0.05  # share of blocks held out (and of documents, for non-asset sources)
    # > 0: the val split takes at most this many blocks of each held-out document, spread over it, so that its
    # KD intervals rest on many conversations (docs/kd.md); 0: val is packed like train (consecutive blocks)
    val_blocks_per_document: int = 0
    batch_size: int = 8
    seed: int = 0
    shard_size: int = 1024  # sequences per shard file
    out: Path | None = None  # default: $LUTQ_HOME/caches/{source}_{template}_L{L}_K{K}_R{R}
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        from lutq.data import THINKING_MODES, mix_shares

        if self.thinking not in THINKING_MODES:
            raise LutqError(f"thinking={self.thinking!r}: choose one of {', '.join(THINKING_MODES)}")
        for key in ("seq_len", "top_k", "batch_size", "shard_size"):
            if getattr(self, key) < (2 if key == "seq_len" else 1):
                raise LutqError(f"cache config {key}={getattr(self, key)} is too small")
        if self.negatives < 0:
            raise LutqError(f"cache config negatives={self.negatives} must be >= 0")
        if self.val_blocks_per_document < 0:
            raise LutqError(f"cache config val_blocks_per_document={self.val_blocks_per_document} must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise LutqError(f"cache config val_fraction={self.val_fraction} must be in [0, 1)")
        if self.total_sequences() < 1:
            raise LutqError("cache config asks for no sequences (num_sequences / max_tokens)")
        if self.split_sizes()["train"] < 1:
            asked = (
                f"max_tokens={self.max_tokens}"
                if self.max_tokens is not None
                else f"num_sequences={self.num_sequences}"
            )
            raise LutqError(
                f"cache config {asked} ({self.total_sequences()} sequence(s)) with val_fraction={self.val_fraction} "
                "leaves no training sequence: ask for more sequences or set val_fraction=0"
            )
        sources = self.sources
        if not sources:
            raise LutqError("cache config names no source")
        if len(set(sources)) < len(sources):
            raise LutqError(f"cache sources {sources} name a source twice")
        for spec in sources:
            if not spec.startswith("hf:") and spec.rpartition(":")[2] in SPLITS:
                raise LutqError(f"cache source {spec!r}: give the whole source; lutq makes the val split")
        weights = self.source_weights
        if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
            raise LutqError(f"cache source_weights {weights}: give one positive weight per source ({sources})")
        for split, n in self.split_sizes().items():
            if len(sources) > 1 and n and 0 in mix_shares(n, weights or [1] * len(sources)):
                raise LutqError(f"cache: {n} {split} sequence(s) cannot be shared by {len(sources)} sources")

    @property
    def sources(self) -> list[str]:
        """The data sources, one or several (a mix)."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    def total_sequences(self) -> int:
        return self.max_tokens // self.seq_len if self.max_tokens is not None else self.num_sequences

    def split_sizes(self) -> dict[str, int]:
        n = self.total_sequences()
        n_val = 0 if self.val_fraction == 0 else max(1, round(n * self.val_fraction))
        return {"train": n - n_val, "val": n_val}


def cache_name(source: str, template: str, L: int, K: int, R: int) -> str:
    """The default cache name, as in the original toolkit: {source}_{template}_L{L}_K{K}_R{R} (a mix joins its
    sources' and templates' names with '+')."""
    return f"{source}_{template}_L{L}_K{K}_R{R}"


# --- the teacher step -----------------------------------------------------------------------------


@torch.inference_mode()
def teacher_targets(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    K: int,
    R: int = 0,
    neg_uniform: torch.Tensor | None = None,
    vocab_limit: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher top-K (ids int32, raw logits fp16, sorted descending) and the log-sum-exp of all its logits
    (fp32, `stored_lse`) for positions 0..L-2 of [B, L] ids.

    With R > 0, `neg_uniform` [B, L-1, R] (floats in [0, 1)) picks R ids per position uniformly from
    the vocabulary (first `vocab_limit` ids) minus that position's top-K, with the teacher's logits there.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    return targets_from_logits(logits, K, R, neg_uniform, vocab_limit)


@torch.inference_mode()
def targets_from_logits(
    logits: torch.Tensor, K: int, R: int = 0, neg_uniform: torch.Tensor | None = None, vocab_limit: int | None = None
) -> dict[str, torch.Tensor]:
    """The part of `teacher_targets` after the forward, on full [B, L, V] logits."""
    logits = logits[:, :-1]
    vals, ids = logits.topk(K, dim=-1)
    stored = vals.to(torch.float16)
    out = {"topk_ids": ids.to(torch.int32), "topk_logits": stored, "teacher_lse": stored_lse(logits, vals, stored)}
    if R:
        assert neg_uniform is not None
        neg = sample_negatives(ids, neg_uniform.to(ids.device), vocab_limit or logits.shape[-1])
        out["neg_ids"] = neg.to(torch.int32)
        out["neg_logits"] = logits.gather(-1, neg).to(torch.float16)
    return out


def stored_lse(logits: torch.Tensor, topk: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of the teacher's logits [.., V] with its top-K (`topk`) counted at their `stored` (fp16)
    values, so exp(stored − lse) and the tail mass sum to exactly 1: the cached teacher is a proper distribution
    (with the fp32 log-sum-exp instead, fp16 rounding of a dominant logit shows up as a first-order KL floor)."""
    # shift by the top-1 logit (topk is sorted descending, so it is the max; any shift is exact, this one keeps
    # exp() <= ~1) instead of logsumexp's own max pass: on the cache writer's hot path this is 0.17 s per
    # 16 x 64 batch of SmolLM2 instead of 0.32 s, next to a 1.7 s teacher forward
    # one [.., V] fp32 temporary either way: fp32 logits subtract into a new tensor, bf16 ones (a GPU teacher)
    # are shifted in place in their fp32 copy (a copy + a subtract: 202 -> 122 ms per 16 x 63 x 49,152 CPU batch)
    top = topk[..., :1].float()
    shifted = logits - top if logits.dtype == torch.float32 else logits.float().sub_(top)
    full = top[..., 0] + shifted.exp_().sum(-1).log_()
    head = torch.logsumexp(topk.float(), dim=-1)
    tail = full + torch.log1p(-torch.exp(head - full).clamp(max=1.0))  # log of the mass outside the top-K
    return torch.logaddexp(torch.logsumexp(stored.float(), dim=-1), tail)


def sample_negatives(topk_ids: torch.Tensor, uniform: torch.Tensor, vocab: int) -> torch.Tensor:
    """Map uniforms [..., R] to ids drawn uniformly from [0, vocab) minus each row's top-K ids [..., K].

    With the excluded ids sorted e_0 < e_1 < ..., the u-th allowed id is u + #{i : e_i - i <= u}.
    """
    K = topk_ids.shape[-1]
    excluded = topk_ids.sort(dim=-1).values
    excluded = torch.where(excluded < vocab, excluded, vocab + K)  # ids past the limit exclude nothing
    n_in = (excluded < vocab).sum(-1, keepdim=True)
    u = (uniform.double() * (vocab - n_in).double()).floor().long()
    shifted = (excluded - torch.arange(K, device=excluded.device)).contiguous()
    return u + torch.searchsorted(shifted, u.contiguous(), right=True)


def negative_uniforms(
    seed: int, split: str, indices: range, positions: int, R: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[len(indices), positions, R] float64 uniforms drawn on `device`; sequence i's draw depends only on
    (seed, split, i) (and the device type: CPU and CUDA generators differ)."""
    out = torch.empty((len(indices), positions, R), dtype=torch.float64, device=device)
    gen = torch.Generator(device=device)
    for row, i in enumerate(indices):
        key = hashlib.sha256(f"{seed}:{split}:{i}".encode()).digest()
        gen.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
        torch.rand((positions, R), generator=gen, dtype=torch.float64, device=device, out=out[row])
    return out


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class CachePlan:
    """Everything decided before the teacher runs: the blocks per split, the shard layout, the meta."""

    out: Path
    blocks: dict[str, np.ndarray]
    shards: list[dict[str, Any]]  # {file, split, start, stop}, in write order
    info: dict[str, Any]
    legacy_hash: str = ""  # the plan hash without the teacher fingerprint (caches written before it was added)


def make_plan(cfg: CacheConfig, model: torch.nn.Module, tokenizer: Any, dtype: torch.dtype) -> CachePlan:
    """Load and split the documents, render and pack them, lay out the shards."""
    from lutq.data import document_splits, source_name, tokenizer_fingerprint

    cfg.validate()
    L, K, R = cfg.seq_len, cfg.top_k, cfg.negatives
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LutqError(f"teacher {cfg.model!r}: tokenizer has no EOS token to separate documents")
    vocab = _logits_size(model)
    vocab_limit = min(len(tokenizer), vocab)
    if vocab < K or (R and vocab_limit - K < 1):
        raise LutqError(f"K={K}, R={R} do not fit the teacher's vocabulary of {vocab}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context < L:
        raise LutqError(
            f"L={L} is longer than the teacher's context ({cfg.model}: max_position_embeddings={context}); "
            "its logits past that are not what it was trained to give. Use a smaller -L"
        )
    wanted = cfg.split_sizes()
    if len(cfg.sources) == 1:
        docs = document_splits(cfg.sources[0], cfg.val_fraction)
        blocks, block_docs, used_docs, template = _source_split_blocks(
            cfg, cfg.sources[0], docs, wanted, tokenizer, f"{cfg.seed}"
        )
        name = cache_name(source_name(cfg.sources[0]), template, L, K, R)
        parts = None
    else:
        blocks, block_docs, used_docs, parts = _mixed_split_blocks(cfg, wanted, tokenizer)
        templates = list(dict.fromkeys(p["template"] for p in parts))
        template = "+".join(templates)
        name = cache_name("+".join(source_name(p["source"]) for p in parts), template, L, K, R)
    doc_starts = {
        split: [i for i, d in enumerate(docs_of) if i == 0 or d != docs_of[i - 1]]
        for split, docs_of in block_docs.items()
    }
    if not len(blocks["train"]):
        raise LutqError(f"source {cfg.source!r} yields no training block of {L} tokens")
    if parts and (empty := [p["source"] for p in parts if not p["sequences"]["train"]]):
        raise LutqError(f"cache sources {empty} yield no training block of {L} tokens")
    shards = [
        {"file": shard_file(split, i), "split": split, "start": a, "stop": min(a + cfg.shard_size, len(b))}
        for split, b in blocks.items()
        for i, a in enumerate(range(0, len(b), cfg.shard_size))
    ]
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "overwrite", "dtype", "device")}
    for key, default in (("val_blocks_per_document", 0), ("source_weights", None)):
        if settings[key] == default:  # left out at its default: caches written before it keep their plan hash
            del settings[key]
    data_hash = hashlib.sha256(b"".join(blocks[s].tobytes() for s in ("train", "val"))).hexdigest()
    arrays = {a: ARRAY_DTYPES[a] for a in ARRAY_DTYPES if R or not a.startswith("neg")}
    teacher_fp = teacher_fingerprint(model)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "teacher": cfg.model,
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "teacher_vocab_size": vocab,
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "name_or_path": str(tokenizer.name_or_path),
            "vocab_size": len(tokenizer),
            "eos_id": int(eos),
        },
        "source": cfg.source,
        **({"sources": parts} if parts else {}),  # a mix: each source's template, documents and sequence ranges
        "thinking": cfg.thinking,
        "template": template,
        "L": L,
        "K": K,
        "R": R,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "negatives": (
            {
                "distribution": "uniform over ids [0, vocab_limit) minus the position's top-K, with replacement",
                "vocab_limit": vocab_limit,
            }
            if R
            else None
        ),
        "sequences": {s: len(b) for s, b in blocks.items()},
        "requested_sequences": wanted,
        "documents_rendered": used_docs,
        # the sequences whose first token begins another document than the sequence before's: the documents,
        # the independent units of a KD evaluation's intervals (KDCache.document_units)
        "document_starts": doc_starts,
        "tokens": {s: len(b) * L for s, b in blocks.items()},
        "arrays": arrays,
        "settings": settings,
        "teacher_fingerprint": teacher_fp,
        # CPU and CUDA generators draw different negatives for the same (seed, split, index): say which one did
        "negatives_device": next(model.parameters()).device.type if R else None,
        "plan_hash": _plan_hash(settings, dtype, vocab, data_hash, arrays, teacher_fp),
        "versions": _versions(),
    }
    out = Path(cfg.out) if cfg.out else lutq_home() / "caches" / name
    return CachePlan(out, blocks, shards, info, _plan_hash(settings, dtype, vocab, data_hash, arrays, None))


def _source_split_blocks(
    cfg: CacheConfig,
    spec: str,
    docs: dict[str, list[Any]],
    wanted: dict[str, int],
    tokenizer: Any,
    seed: str,
    *,
    mixed: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, list[int]], dict[str, int], str]:
    """The blocks per split of source `spec` (and each block's document, the documents read, the template name).

    Train packs whole renderings back to back in a seeded shuffled document order; val does the same, or with
    `val_blocks_per_document` spreads at most that many blocks over each held-out document. In a mix (`mixed`),
    the blocks of a source of plain text (books, plays, manuals: few long documents) are spread over its
    documents instead, in both splits (`spread_or_pack`), so that its share is not the first pages of a few
    documents and its val share is filled even when it holds out only a few (long) documents.
    """
    from lutq.data import iter_render, pack, spread, spread_or_pack

    eos = tokenizer.eos_token_id
    is_chat = any(d.messages for split in docs.values() for d in split)
    template = ({"none": "raw"}.get(cfg.thinking, f"think_{cfg.thinking}")) if is_chat else "text"
    blocks, block_docs, used_docs = {}, {}, {}
    for split, n in wanted.items():
        order = list(docs[split])
        random.Random(f"{seed}:{split}").shuffle(order)
        block_docs[split] = []
        if mixed and not is_chat:  # long texts: a few blocks from each document
            blocks[split] = spread_or_pack(order, tokenizer, n, cfg.seq_len, cfg.thinking, block_docs[split])
            used_docs[split] = len(set(block_docs[split]))
        else:
            counter = _Counter(order)
            sources: list[int] = []  # each rendering's document ("both" renders a conversation twice)
            renderings = iter_render(counter, tokenizer, cfg.thinking, batch=8, sources=sources)
            if split == "val" and cfg.val_blocks_per_document:
                per_doc = cfg.val_blocks_per_document
                blocks[split] = spread(
                    renderings, cfg.seq_len, eos, per_doc, max_blocks=n, block_docs=block_docs[split], doc_of=sources
                )
            else:
                blocks[split] = pack(
                    renderings, cfg.seq_len, eos, max_blocks=n, block_docs=block_docs[split], doc_of=sources
                )
            used_docs[split] = counter.n
        if len(blocks[split]) < n:
            console.print(
                f"[yellow]warning:[/] {spec} gives only {len(blocks[split])} {split} blocks "
                f"of {cfg.seq_len} tokens ({n} asked for)"
            )
    return blocks, block_docs, used_docs, template


def _mixed_split_blocks(
    cfg: CacheConfig, wanted: dict[str, int], tokenizer: Any
) -> tuple[dict[str, np.ndarray], dict[str, list[int]], dict[str, int], list[dict[str, Any]]]:
    """A mix of `cfg.sources` (even, or in proportion to `cfg.source_weights`): each gives its share of every
    split from its own train / val documents (an asset's own held-out files; so a corpus's held-out documents stay
    out of training), laid out source after source within a split (contiguous, so each keeps its document units).
    Returns the splits' blocks, each block's document (numbered across the sources), the documents read, and per
    source its template, document counts and sequence range per split (meta `sources`)."""
    from lutq.data import document_splits, mix_shares

    sources = cfg.sources
    shares = {split: mix_shares(n, cfg.source_weights or [1] * len(sources)) for split, n in wanted.items()}
    blocks: dict[str, list[np.ndarray]] = {s: [] for s in wanted}
    block_docs: dict[str, list[int]] = {s: [] for s in wanted}
    used_docs = dict.fromkeys(wanted, 0)
    parts: list[dict[str, Any]] = []
    for i, spec in enumerate(sources):
        docs = document_splits(spec, cfg.val_fraction)
        asked = {split: shares[split][i] for split in wanted}
        got, got_docs, used, template = _source_split_blocks(
            cfg, spec, docs, asked, tokenizer, f"{cfg.seed}:{spec}", mixed=True
        )
        part: dict[str, Any] = {"source": spec, "template": template, "sequences": {}, "ranges": {}}
        if cfg.source_weights:
            part["weight"] = cfg.source_weights[i]
        for split in wanted:
            start = sum(len(b) for b in blocks[split])
            blocks[split].append(got[split])
            offset = max(block_docs[split], default=-1) + 1  # documents numbered across the sources
            block_docs[split].extend(d + offset for d in got_docs[split])
            used_docs[split] += used[split]
            part["sequences"][split] = len(got[split])
            part["ranges"][split] = [start, start + len(got[split])]
        part["documents_rendered"] = used
        parts.append(part)
    stacked = {s: np.concatenate(b) if b else np.zeros((0, cfg.seq_len), np.int32) for s, b in blocks.items()}
    return stacked, block_docs, used_docs, parts


class _Counter:
    """Iterate documents while counting how many were read."""

    def __init__(self, docs: list[Any]) -> None:
        self.docs, self.n = docs, 0

    def __iter__(self) -> Iterator[Any]:
        for d in self.docs:
            self.n += 1
            yield d


def _plan_hash(
    settings: dict[str, Any],
    dtype: torch.dtype,
    vocab: int,
    data_hash: str,
    arrays: dict[str, str],
    teacher: str | None,
) -> str:
    """The identity of a plan; `teacher` None gives the hash of caches written before `teacher_fingerprint`."""
    parts = (sorted(settings.items()), str(dtype), vocab, data_hash, FORMAT_VERSION, sorted(arrays))
    key = repr(parts if teacher is None else (*parts, teacher))
    return hashlib.sha256(key.encode()).hexdigest()


@torch.no_grad()
def teacher_fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """sha256 over the teacher's parameter and buffer names, shapes, dtypes and up to `per_tensor` evenly spaced
    values of each (their exact bytes, so the same on any device): a resumed cache refuses a teacher whose weights
    changed under the same --model (a checkpoint rewritten by a training run), at the cost of a few gathers."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > per_tensor:
            flat = flat[torch.from_numpy(spaced_indices(flat.numel(), per_tensor)).to(flat.device)]
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    import lutq

    return {
        "lutq": lutq.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


# --- writing --------------------------------------------------------------------------------------


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve 'auto': device cuda:LOCAL_RANK if CUDA is there, else cpu; dtype bf16 on CUDA, else fp32."""
    from lutq.models.load import parse_dtype

    if device == "auto":
        cuda = torch.cuda.is_available()
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    else:
        dev = resolve_device(device)
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else parse_dtype(dtype)
    assert dt is not None
    return dev, dt


def load_teacher(cfg: CacheConfig) -> tuple[torch.nn.Module, Any]:
    """The teacher model and tokenizer, on the configured device in the configured dtype."""
    from lutq.models import load_model

    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    return load_model(cfg.model, dtype=dtype, device=device)


def prepare(
    cfg: CacheConfig, teacher: tuple[torch.nn.Module, Any] | None = None, *, rank: int = 0
) -> tuple[CachePlan, torch.nn.Module]:
    """Load the teacher, make the plan, and claim the output directory (refusing a different plan)."""
    model, tokenizer = teacher or load_teacher(cfg)
    dtype = next(model.parameters()).dtype
    plan = make_plan(cfg, model, tokenizer, dtype)
    out = plan.out
    # OUT is new, empty or a KD cache (resumed, or replaced with --overwrite): never a directory of anything else
    check_replaceable(
        out,
        what=f"a KD cache (no {META} or {PROGRESS})",
        is_ours=lambda p: any((p / f).is_file() for f in (META, PROGRESS)),
    )
    if cfg.overwrite and rank == 0 and out.exists():
        shutil.rmtree(out)
    for f in (META, PROGRESS):
        if (out / f).is_file():
            old = read_json(out / f, what="KD cache")
            # a cache written before the teacher fingerprint was added is checked without it
            old = old if isinstance(old, dict) else {}
            accepted = {plan.info["plan_hash"]} | (set() if "teacher_fingerprint" in old else {plan.legacy_hash})
            if old.get("plan_hash") not in accepted:
                raise LutqError(
                    f"{out} holds a KD cache with other settings or data ({f}); "
                    "pass --overwrite or choose another --out"
                )
            was, now = old.get("negatives_device"), plan.info["negatives_device"]
            if f == PROGRESS and was and now and now not in was.split("+"):
                console.print(
                    f"[yellow]note:[/] {out}: the shards written so far drew their random negatives on {was}, the "
                    f"rest draw them on {now}: each is still uniform and fixed by (seed, split, index), but the "
                    f"cache will not be byte-identical to one written on one device"
                )
                plan.info["negatives_device"] = f"{was}+{now}"  # meta.json says the cache is mixed
            elif f == PROGRESS and was:
                plan.info["negatives_device"] = was
    if rank == 0 and out.is_dir():
        remove_stale_scratch_in(out)  # a shard-sized temp file of a killed build (the other ranks wait for rank 0)
    if rank == 0 and (out / META).is_file():
        _add_document_starts(out, plan)
    if not (out / META).is_file():
        atomic_write_json(out / PROGRESS, {**plan.info, "shards": plan.shards})
    return plan, model


def _add_document_starts(out: Path, plan: CachePlan) -> None:
    """A complete cache written before meta.json recorded its documents gets them from the plan, which holds the
    same blocks (its plan hash matched): re-running `lutq cache` with the same settings upgrades it."""
    meta = read_json(out / META, what="KD cache")
    if isinstance(meta, dict) and "document_starts" not in meta:
        atomic_write_json(out / META, {**meta, "document_starts": plan.info["document_starts"]})
        console.print(f"{out}: recorded where its documents start (the units of KD evaluation intervals)")


def write_shards(
    cfg: CacheConfig,
    teacher: tuple[torch.nn.Module, Any] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    sync: Callable[[], Any] | None = None,
) -> tuple[Path, dict[str, float]]:
    """Write this rank's missing shards (every world_size-th, from `rank`). Returns (dir, stats).

    `sync` (a barrier, under torchrun) lets rank 0 claim the directory before the other ranks look at it.
    """
    teacher = teacher or load_teacher(cfg)
    if sync is not None and rank != 0:
        sync()
    plan, model = prepare(cfg, teacher, rank=rank)
    if sync is not None and rank == 0:
        sync()
    device = next(model.parameters()).device
    L, K, R = cfg.seq_len, cfg.top_k, cfg.negatives
    vocab_limit = plan.info["negatives"]["vocab_limit"] if R else None
    mine = [s for j, s in enumerate(plan.shards) if j % world_size == rank]
    names = list(plan.info["arrays"])
    todo = [s for s in mine if not _shard_done(plan.out / s["file"], names, s["stop"] - s["start"], L, K, R)]
    total = sum(s["stop"] - s["start"] for s in todo)
    done, t0 = 0, time.perf_counter()
    bar = progress(_rate_column())
    bar.disable = rank != 0  # one bar, on rank 0
    # a shard is written (serialize, sha256, atomic rename) by one background thread while the teacher runs on
    # the next: on an H200 the writer's work after the forward was 66% of the forward's time, ~3 ms/MB of it the
    # write (docs/benchmarks.md, "GPU"); at most one write is in flight, and waiting on it re-raises its error here
    pending: Future[str] | None = None
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="lutq-shard-writer") as writer:
        task = bar.add_task(f"caching {plan.info['name']}", total=total, rate="")
        for s in todo:
            ids = plan.blocks[s["split"]][s["start"] : s["stop"]]
            parts: dict[str, list[torch.Tensor]] = {}
            for a in range(0, len(ids), cfg.batch_size):
                rows = range(s["start"] + a, s["start"] + min(a + cfg.batch_size, len(ids)))
                x = torch.from_numpy(ids[a : a + cfg.batch_size]).to(device=device, dtype=torch.long)
                u = negative_uniforms(cfg.seed, s["split"], rows, L - 1, R, device) if R else None
                for k, v in teacher_targets(model, x, K, R, u, vocab_limit).items():
                    parts.setdefault(k, []).append(v)
                done += len(rows)
                rate = done * L / (time.perf_counter() - t0)
                bar.update(task, advance=len(rows), rate=f"{rate:,.0f} tok/s")
            arrays = {"input_ids": np.ascontiguousarray(ids)}
            arrays.update({k: torch.cat(v).cpu().numpy() for k, v in parts.items()})
            if pending is not None:
                pending.result()
            pending = writer.submit(write_shard, plan.out / s["file"], arrays)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - t0
    return plan.out, {
        "sequences": done,
        "tokens": done * L,
        "seconds": seconds,
        "tokens_per_s": done * L / seconds if done else 0.0,
    }


def _shard_done(path: Path, names: list[str], n: int, L: int, K: int, R: int) -> bool:
    """Whether a planned shard is on disk, whole: shards are renamed into place complete, so only outside damage
    (a partial copy) leaves one that does not open as planned; that one is written again."""
    if not path.exists():
        return False
    try:
        check_shard(path, open_shard(path), names, n, L, K, R)
    except LutqError as e:
        console.print(f"[yellow]warning:[/] {e}; writing it again")
        return False
    return True


def _rate_column() -> Any:
    from rich.progress import TextColumn

    return TextColumn("{task.fields[rate]}")


def finalize_cache(out: str | Path) -> Path:
    """Check that every planned shard exists, hash them, write meta.json (the cache is then complete)."""
    out = Path(out)
    if (out / META).is_file() and not (out / PROGRESS).is_file():
        return out
    if not (out / PROGRESS).is_file():
        raise LutqError(f"{out}: no {PROGRESS}; not an unfinished KD cache")
    plan = read_json(out / PROGRESS, what="KD cache")
    missing = [s["file"] for s in plan["shards"] if not (out / s["file"]).is_file()]
    if missing:
        raise LutqError(
            f"{out}: {len(missing)} shard(s) not written yet ({', '.join(missing[:3])}...); "
            "re-run `lutq cache` with the same settings to resume"
        )
    shards: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for s in plan.pop("shards"):
        path = out / s["file"]
        shards[s["split"]].append(
            {
                "file": s["file"],
                "sequences": s["stop"] - s["start"],
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    total_bytes = sum(s["bytes"] for split in shards.values() for s in split)
    total_tokens = sum(plan["tokens"].values())
    meta = {**plan, "shards": shards, "bytes": total_bytes, "bytes_per_token": total_bytes / total_tokens}
    atomic_write_json(out / META, meta)
    (out / PROGRESS).unlink()
    return out


def build_cache(cfg: CacheConfig, teacher: tuple[torch.nn.Module, Any] | None = None) -> Path:
    """Build (or resume, or confirm) the KD cache of `cfg`; returns its directory.

    Under torchrun (RANK / WORLD_SIZE set) every rank writes its slice of the shards and rank 0 writes
    meta.json. Timings go to build.json (kept apart so meta.json is the same however it was built).
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    with _process_group(world) as dist:
        sync = dist.barrier if world > 1 else None
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        out, stats = write_shards(cfg, teacher, rank=rank, world_size=world, sync=sync)
        if world > 1:
            dist.barrier()
        if rank == 0:
            finalize_cache(out)
            _log_build(out, started, stats, world)
        if world > 1:
            dist.barrier()
    return out


@contextlib.contextmanager
def _process_group(world: int) -> Iterator[Any]:
    """torch.distributed for barriers when run by torchrun (gloo: only barriers cross processes)."""
    import torch.distributed as dist

    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield dist
    finally:
        if created:
            dist.destroy_process_group()


def _log_build(out: Path, started: str, stats: dict[str, float], world: int) -> None:
    import platform

    log = read_json(out / BUILD_LOG, what="KD cache build log") if (out / BUILD_LOG).is_file() else {"runs": []}
    log["runs"].append(
        {
            "started": started,
            "world_size": world,
            "host": platform.node(),
            "rank0": {k: round(v, 3) for k, v in stats.items()},
        }
    )
    atomic_write_json(out / BUILD_LOG, log)


def config_from_meta(meta: dict[str, Any]) -> CacheConfig:
    """The CacheConfig a cache was built with (for verify and for re-building)."""
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    return CacheConfig.from_dict({k: v for k, v in meta["settings"].items() if k in fields})


__all__ = [
    "CacheConfig",
    "CachePlan",
    "build_cache",
    "cache_name",
    "config_from_meta",
    "finalize_cache",
    "make_plan",
    "negative_uniforms",
    "sample_negatives",
    "teacher_fingerprint",
    "teacher_targets",
    "write_shards",
]
