"""Flat token files for pretraining: documents -> token ids in one `.npy` memmap, EOS between documents.

    data.npy             uint16 (vocab <= 65536) or uint32, shape [tokens]: doc0 EOS doc1 EOS ...
    data.npy.meta.json   format + version, tokenizer (name, fingerprint, vocab size, EOS id), dtype,
                         token and document counts, sources

Documents are ordered: the training documents of every source, then the held-out documents of every
source, so the tail of the file (which the pretrainer holds out for validation) is made of whole
held-out documents whenever the file was not truncated. Training refuses a token file whose meta is
missing or does not match the file (`TokenData.open`).

Tokenizers (`load_tokenizer`): `gpt2` (the GPT-2 BPE from the openai-whisper sdist, fetched once into
$LUTQ_HOME/tokenizers/gpt2), a model asset name (`smollm2-135m-instruct`), or a directory holding an HF
tokenizer (tokenizer.json).
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import TextColumn

from lutq import __version__
from lutq.core.atomic import atomic_dir, atomic_write_json, remove_stale_scratch, sha256_file
from lutq.core.console import console, progress
from lutq.core.errors import LutqError
from lutq.core.formats import read_versioned_json
from lutq.core.home import lutq_home

FORMAT = "lutq-tokens"
FORMAT_VERSION = 1
META_SUFFIX = ".meta.json"
CHUNK_DOCS = 64  # documents per task sent to a worker

# GPT-2 BPE, offline: whisper/assets/gpt2.tiktoken in the openai-whisper sdist (byte-identical to tiktoken's
# r50k_base ranks). Both the sdist and the file are pinned.
GPT2_PACKAGE = "openai-whisper==20250625"
GPT2_SDIST = "openai_whisper-20250625.tar.gz"
GPT2_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
GPT2_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOS = "<|endoftext|>"


def meta_path(path: str | os.PathLike[str]) -> Path:
    """`data.npy` -> `data.npy.meta.json`."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


# --- tokenizers -----------------------------------------------------------------------------------


def gpt2_tokenizer_dir() -> Path:
    """$LUTQ_HOME/tokenizers/gpt2 (an HF tokenizer directory), built on first use from the pinned sdist."""
    dest = lutq_home() / "tokenizers" / "gpt2"
    if (dest / "manifest.json").is_file():
        return dest
    from lutq.assets.fetch import download
    from lutq.assets.registry import Source

    archive = download(Source("pypi-sdist", GPT2_PACKAGE, GPT2_SDIST, GPT2_SDIST_SHA256))
    with atomic_dir(dest) as tmp:
        with tarfile.open(archive) as tar:
            for member in (GPT2_MEMBER, GPT2_MEMBER.split("/")[0] + "/LICENSE"):
                f = tar.extractfile(member)
                if f is None:
                    raise LutqError(f"{archive}: member {member} missing")
                (tmp / Path(member).name).write_bytes(f.read())
        ranks = tmp / "gpt2.tiktoken"
        if (digest := sha256_file(ranks)) != GPT2_TIKTOKEN_SHA256:
            raise LutqError(f"{archive}: gpt2.tiktoken has sha256 {digest}, expected {GPT2_TIKTOKEN_SHA256}")
        hf = _convert_tiktoken(ranks)
        hf.save_pretrained(tmp)
        atomic_write_json(
            tmp / "manifest.json",
            {
                "name": "gpt2",
                "source": f"pypi-sdist:{GPT2_PACKAGE}",
                "member": GPT2_MEMBER,
                "sha256": GPT2_TIKTOKEN_SHA256,
                "vocab_size": len(hf),
                "licence": "MIT (openai-whisper)",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    console.print(f"[green]built[/] GPT-2 tokenizer -> {dest}")
    return dest


def _convert_tiktoken(ranks: Path) -> Any:
    """The GPT-2 BPE ranks as an HF fast tokenizer, checked against tiktoken on a probe text."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    hf = PreTrainedTokenizerFast(
        tokenizer_object=TikTokenConverter(
            vocab_file=str(ranks), pattern=r50k_pat_str, extra_special_tokens=[GPT2_EOS]
        ).converted(),
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        unk_token=GPT2_EOS,
    )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(ranks), expected_hash=GPT2_TIKTOKEN_SHA256),
        special_tokens={GPT2_EOS: 50256},
    )
    probe = "Hello world! It's 2025; naïve café — ÆØÅ 東京 12345\n\n  def f(x):\treturn x**2 "
    if hf(probe, add_special_tokens=False)["input_ids"] != enc.encode_ordinary(probe) or len(hf) != 50257:
        raise LutqError(f"{ranks}: the converted GPT-2 tokenizer disagrees with tiktoken")
    return hf


def resolve_tokenizer(spec: str | os.PathLike[str]) -> tuple[Path, str]:
    """(directory holding the tokenizer, canonical name) for `gpt2`, a model asset, or a directory."""
    spec = str(spec)
    if spec == "gpt2":
        return gpt2_tokenizer_dir(), "gpt2"
    from lutq.assets.registry import ASSETS

    if spec in ASSETS:
        from lutq.assets.fetch import asset_path, fetch, is_fetched

        if ASSETS[spec].kind != "model":
            raise LutqError(f"tokenizer {spec!r}: asset {spec!r} is a {ASSETS[spec].kind} corpus, not a model")
        return (asset_path(spec) if is_fetched(spec) else fetch(spec)), spec
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise LutqError(f"tokenizer {spec!r}: not 'gpt2', not a model asset, not a directory")
    if not (path / "tokenizer.json").is_file():
        raise LutqError(f"tokenizer {spec!r}: {path} has no tokenizer.json (a fast HF tokenizer is needed)")
    return path, str(path.resolve())


def load_tokenizer(spec: str | os.PathLike[str]) -> tuple[Any, str]:
    """(HF tokenizer, canonical name) for a tokenizer spec (see `resolve_tokenizer`)."""
    from transformers import AutoTokenizer

    path, name = resolve_tokenizer(spec)
    try:
        return AutoTokenizer.from_pretrained(path), name
    except (OSError, ValueError) as e:
        raise LutqError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e


def separator_id(tokenizer: Any) -> int:
    """The document separator: `<|endoftext|>` when the vocabulary has it, else the EOS token."""
    vocab = tokenizer.get_vocab()
    if GPT2_EOS in vocab:
        return int(vocab[GPT2_EOS])
    if tokenizer.eos_token_id is None:
        raise LutqError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return int(tokenizer.eos_token_id)


# --- parallel tokenization ------------------------------------------------------------------------

_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    encodings = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


def _chunks(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield list(texts[i : i + size])


def _encoded(texts: Sequence[str], tokenizer_json: str, workers: int) -> Iterator[list[np.ndarray]]:
    """Token id arrays of `texts`, chunk by chunk, in order (a process pool when workers > 1).

    At most 4 chunks per worker are in flight, so memory stays bounded however far the workers run ahead. A
    worker that dies (killed, out of memory, failed start) is an error: `multiprocessing.Pool` would wait for it
    forever."""
    if workers <= 1:
        _init_worker(tokenizer_json)
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        yield from map(_encode_chunk, _chunks(texts, CHUNK_DOCS))
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # fork is unsafe with torch / tokenizer threads
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer_json,))
    pending: deque[Future[list[np.ndarray]]] = deque()
    try:
        for chunk in _chunks(texts, CHUNK_DOCS):
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise LutqError(
            f"a tokenizer worker process died ({e}); run with --workers 1 to see its error, or fewer "
            "workers if memory ran out (a script calling prepare_tokens with workers > 1 needs an "
            "`if __name__ == '__main__':` guard)"
        ) from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _document_texts(sources: Sequence[str], tokenizer: Any) -> tuple[list[str], int]:
    """All documents as text: every source's training documents, then every source's held-out ones.
    Returns (texts, number of held-out documents at the end). Chat documents become their contents."""
    from lutq.data import document_splits, render_text

    train: list[str] = []
    val: list[str] = []
    for spec in sources:
        splits = document_splits(spec)
        for name, out in (("train", train), ("val", val)):
            out.extend(render_text(d, tokenizer, thinking="none")[0] for d in splits[name])
    texts = [t for t in train + val if t]
    return texts, len([t for t in val if t])


def prepare_tokens(
    tokenizer_spec: str,
    sources: Sequence[str],
    out: str | os.PathLike[str],
    max_tokens: int | None = None,
    workers: int | None = None,
) -> TokenData:
    """Tokenize `sources` (corpus assets, text/JSON files or directories, hf:NAME) into the flat token file
    `out` (+ `out.meta.json`), EOS after every document, at most `max_tokens` tokens. Atomic."""
    from lutq.data import tokenizer_fingerprint

    out = Path(out)
    if out.suffix != ".npy":
        raise LutqError(f"{out}: the token file must end in .npy")
    if not sources:
        raise LutqError("no sources given (an asset like shakespeare, text files, or hf:NAME)")
    if max_tokens is not None and max_tokens <= 0:
        raise LutqError(f"max_tokens must be positive, got {max_tokens}")
    tokenizer, name = load_tokenizer(tokenizer_spec)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LutqError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer")
    # Ids need not be dense (len() can be below the largest id + 1): the dtype must hold the largest one.
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    eos = separator_id(tokenizer)
    texts, n_val_docs = _document_texts(sources, tokenizer)
    if not texts:
        raise LutqError(f"sources {list(sources)} hold no text")
    workers = workers or min(8, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out)  # what killed prepares of `out` left (possibly GBs)
    raw_fd, raw_name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".raw", dir=out.parent)
    raw = Path(raw_name)
    try:
        with os.fdopen(raw_fd, "wb") as f:
            n_tokens, n_docs, n_heldout, cut = _write_stream(
                f, texts, backend.to_str(), workers, eos, dtype, max_tokens, len(texts) - n_val_docs
            )
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lutq_version": __version__,
            "file": out.name,
            "dtype": dtype.name,
            "tokens": n_tokens,
            "documents": n_docs,
            "tokenizer": name,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab_size,
            "eos_id": eos,
            "eos_token": tokenizer.convert_ids_to_tokens(eos),
            "sources": list(sources),
            "heldout_tail_tokens": n_heldout,
            "truncated": n_docs < len(texts) or cut,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _raw_to_npy(raw, out, dtype, n_tokens, meta)
    finally:
        raw.unlink(missing_ok=True)
    console.print(f"[green]wrote[/] {out}: {n_tokens:,} tokens, {n_docs:,} documents ({dtype.name})")
    return TokenData.open(out)


def _write_stream(
    f: Any,
    texts: Sequence[str],
    tokenizer_json: str,
    workers: int,
    eos: int,
    dtype: np.dtype,
    max_tokens: int | None,
    first_heldout: int,
) -> tuple[int, int, int, bool]:
    """Append doc EOS doc EOS ... to `f`. Returns (tokens, documents, tokens of the documents from index
    `first_heldout` on, whether the last document was cut by `max_tokens`)."""
    n_tokens = n_docs = n_heldout = 0
    cut = False
    with progress(TextColumn("{task.fields[tokens]:,} tokens")) as bar:
        task = bar.add_task("tokenizing", total=len(texts), tokens=0)
        for chunk in _encoded(texts, tokenizer_json, workers):
            for ids in chunk:
                doc = np.append(ids, np.uint32(eos)).astype(dtype)
                if max_tokens is not None and n_tokens + len(doc) > max_tokens:
                    doc, cut = doc[: max_tokens - n_tokens], True
                f.write(doc.tobytes())
                n_tokens += len(doc)
                n_heldout += len(doc) if n_docs >= first_heldout else 0
                n_docs += 1
                if n_tokens == max_tokens:
                    break
            bar.update(task, advance=len(chunk), tokens=n_tokens)
            if n_tokens == max_tokens:
                break
    return n_tokens, n_docs, n_heldout, cut


def _raw_to_npy(raw: Path, out: Path, dtype: np.dtype, n_tokens: int, meta: dict[str, Any]) -> None:
    """Copy the raw stream into `out` via open_memmap at a temporary name, write the meta, then rename both.

    The old meta is removed before the new token file takes its place, so a kill between the two renames leaves
    a token file without meta (refused by `TokenData.open`), never new tokens described by the old meta."""
    tmp_npy = out.with_name(f".{out.name}.{os.getpid()}.npy.tmp")
    tmp_meta = out.with_name(f".{out.name}.{os.getpid()}.meta.tmp")
    try:
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(n_tokens,))
        src = np.memmap(raw, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        step = 1 << 24
        for i in range(0, n_tokens, step):
            arr[i : i + step] = src[i : i + step]
        arr.flush()
        del arr, src
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        meta_path(out).unlink(missing_ok=True)
        os.replace(tmp_npy, out)
        os.replace(tmp_meta, meta_path(out))
    except BaseException:
        tmp_npy.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
        raise


# --- reading --------------------------------------------------------------------------------------


@dataclass
class TokenData:
    """An opened, validated token file: `tokens` (read-only memmap) and its `meta`."""

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TokenData:
        """Open `path` and check it against `path.meta.json` (format, dtype, size); errors name the file."""
        path = Path(path)
        mpath = meta_path(path)
        if not path.is_file():
            raise LutqError(f"token file not found: {path}")
        if not mpath.is_file():
            raise LutqError(f"{mpath}: missing; a token file needs its meta (write both with `lutq data prepare`)")
        meta = read_versioned_json(mpath, format=FORMAT, max_version=FORMAT_VERSION, what="lutq token meta")
        for key, kind in (("dtype", str), ("tokens", int), ("vocab_size", int), ("eos_id", int), ("tokenizer", str)):
            if key not in meta:
                raise LutqError(f"{mpath}: missing key {key!r}")
            if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
                raise LutqError(f"{mpath}: {key} is {meta[key]!r}, expected {kind.__name__}")
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise LutqError(f"{path}: not a readable .npy file ({e})") from e
        if tokens.ndim != 1:
            raise LutqError(f"{path}: expected a flat [tokens] array, got shape {tokens.shape}")
        if tokens.dtype.name != meta["dtype"]:
            raise LutqError(f"{path}: dtype {tokens.dtype.name}, but {mpath.name} says {meta['dtype']}")
        if len(tokens) != meta["tokens"]:
            raise LutqError(
                f"{path}: {len(tokens):,} tokens, but {mpath.name} says {meta['tokens']:,} (truncated or replaced file)"
            )
        if meta["vocab_size"] > np.iinfo(tokens.dtype).max + 1:
            raise LutqError(f"{mpath}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
        if not 0 <= meta["eos_id"] < meta["vocab_size"]:
            raise LutqError(
                f"{mpath}: eos_id {meta['eos_id']} is outside the vocabulary (vocab_size {meta['vocab_size']})"
            )
        return cls(path=path, meta=meta, tokens=tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta["tokenizer"])

    def load_tokenizer(self) -> Any:
        """The tokenizer named in the meta; an error when its fingerprint differs from the recorded one."""
        from lutq.data import tokenizer_fingerprint

        tokenizer, _ = load_tokenizer(self.tokenizer_name)
        recorded = self.meta.get("tokenizer_fingerprint")
        if recorded and tokenizer_fingerprint(tokenizer) != recorded:
            raise LutqError(
                f"{meta_path(self.path)}: tokenizer {self.tokenizer_name!r} has changed since the data "
                "was prepared (fingerprint mismatch); re-run `lutq data prepare`"
            )
        return tokenizer
