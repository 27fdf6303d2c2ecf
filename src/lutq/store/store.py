"""The artefact store: named, checksummed `.tar.zst` / `.tar.lz4` archives in any fsspec location.

Layout at the store URL (a local directory by default; `memory://`, `s3://`, `gs://`, a mounted Google
Drive folder, ... anything fsspec opens):

    NAME.tar.zst        the packed directory or file (NAME may contain "/" to group artefacts)
    NAME.json           manifest: codec, sha256 + size of the archive and of every file, when, what
    shortcuts.json      short names like `cache:L64` -> artefact name (+ default destination)

A push writes the archive under a temporary name, renames it, and writes the manifest last, so a reader
never sees a manifest for a half-written archive. A pull streams, verifies every checksum and only then
renames the unpacked result into place: a failed or corrupt pull never touches an existing destination.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape

from lutq import __version__
from lutq.core.atomic import atomic_dir, scratch_dir, sha256_file
from lutq.core.console import console, progress
from lutq.core.errors import LutqError
from lutq.core.home import lutq_home
from lutq.store.archive import CODECS, HashingReader, HashingWriter, check_codec, list_files, pack, unpack

MANIFEST_FORMAT = "lutq-store-artefact"
SHORTCUTS_FILE = "shortcuts.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
SHORTCUT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Where `pull` puts an artefact named by a shortcut without its own destination, by shortcut prefix.
KIND_DIRS = {"cache": "caches", "ckpt": "checkpoints", "run": "runs"}


def default_store_url() -> str:
    """$LUTQ_STORE, else the local directory `lutq_home()/store`."""
    return os.environ.get("LUTQ_STORE") or str(lutq_home() / "store")


@dataclass
class Manifest:
    """What `NAME.json` says about an artefact."""

    name: str
    archive: str
    codec: str
    kind: str  # "dir" | "file"
    archive_sha256: str
    archive_bytes: int
    files: dict[str, dict[str, Any]]
    created: str = ""
    lutq_version: str = ""
    source: str = ""
    format: str = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise LutqError(f"{where}: not a lutq store manifest (format={got!r})")
        try:
            m = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise LutqError(f"{where}: incomplete manifest ({e})") from e
        # a damaged or hand-edited manifest is a clear error, not a KeyError half-way through a pull
        files_ok = isinstance(m.files, dict) and all(
            isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
            for f in m.files.values()
        )
        expected = m.name.rsplit("/", 1)[-1] + CODECS.get(m.codec, "?") if isinstance(m.name, str) else None
        if (
            not files_ok
            or m.kind not in ("dir", "file")
            or m.codec not in CODECS
            or m.archive != expected
            or (m.kind == "file" and len(m.files) != 1)
            or not isinstance(m.archive_sha256, str)
            or not isinstance(m.archive_bytes, int)
        ):
            raise LutqError(f"{where}: malformed manifest (kind, codec, archive or files do not check out)")
        return m


@dataclass
class Shortcut:
    """A short name for an artefact (`cache:L64` -> `caches/sharegpt_chat_L64_K64_R0`)."""

    name: str
    dest: str | None = None

    def destination(self, shortcut: str) -> Path:
        if self.dest:
            return Path(self.dest).expanduser()
        kind = shortcut.split(":", 1)[0] if ":" in shortcut else ""
        base = self.name.rsplit("/", 1)[-1]
        return Path(KIND_DIRS[kind]) / base if kind in KIND_DIRS else Path(base)


@dataclass
class Store:
    """An artefact store at `url` (default: $LUTQ_STORE or `lutq_home()/store`)."""

    url: str = ""
    fs: Any = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = self.url or default_store_url()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(self.url))
        except (ImportError, ValueError) as e:
            raise LutqError(f"store {self.url}: cannot open ({e}); install the fsspec plugin for it") from e
        self.root = self.root.rstrip("/")
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.root, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def _manifest_path(self, name: str) -> str:
        return self._path(f"{check_name(name)}.json")

    # -- small JSON files, written temp + rename -----------------------------------------------------
    def _read_json(self, rel: str) -> dict[str, Any] | None:
        path = self._path(rel)
        if not self.fs.exists(path):
            return None
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except json.JSONDecodeError as e:
            raise LutqError(f"{self.url}/{rel}: invalid JSON ({e})") from e

    def _write_json(self, rel: str, obj: Any) -> None:
        path = self._path(rel)
        self._makedirs_for(path)
        tmp = self._path(f"{rel}.partial-{uuid.uuid4().hex[:8]}")
        with self.fs.open(tmp, "wb") as f:
            f.write((json.dumps(obj, indent=2) + "\n").encode())
        self.fs.mv(tmp, path)

    def _makedirs_for(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""  # "x.json" at a filesystem's root has none
        if parent:
            self.fs.makedirs(parent, exist_ok=True)

    # -- artefacts -----------------------------------------------------------------------------------
    def manifest(self, name: str) -> Manifest:
        """The manifest of artefact `name` (LutqError naming what exists when it is missing)."""
        data = self._read_json(f"{check_name(name)}.json")
        if data is None:
            have = ", ".join(m.name for m in self.list()) or "nothing"
            raise LutqError(f"store {self.url}: no artefact {name!r} (have: {have})")
        return Manifest.from_dict(data, f"{self.url}/{name}.json")

    def list(self) -> list[Manifest]:
        """All artefacts in the store, sorted by name."""
        if not self.fs.exists(self.root):
            return []
        out = []
        for path in sorted(self.fs.find(self.root)):
            rel = path[len(self.root) + 1 :] if self.root else path
            if not rel.endswith(".json") or rel == SHORTCUTS_FILE or ".partial-" in rel:
                continue
            try:  # one damaged manifest is named, and does not hide the others
                data = self._read_json(rel)
                if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
                    out.append(Manifest.from_dict(data, f"{self.url}/{rel}"))
            except LutqError as e:
                console.print(f"[yellow]store list: skipped {escape(str(e))}[/]")
        return out

    def push(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        codec: str = "zst",
        level: int | None = None,
        show_progress: bool = True,
    ) -> Manifest:
        """Pack `path` (directory or file) as `NAME.tar.zst|lz4` + `NAME.json`; replaces an older `name`."""
        check_name(name)
        check_codec(codec)
        path = Path(path).expanduser()
        if not path.exists():
            raise LutqError(f"store push: {path} does not exist")
        archive = f"{name}{CODECS[codec]}"
        final = self._path(archive)
        tmp = self._path(f"{archive}.partial-{uuid.uuid4().hex[:8]}")
        self._makedirs_for(final)
        total = sum(p.stat().st_size for _, p in list_files(path))
        try:
            with _bar(f"push {name}", total, show_progress) as advance, self.fs.open(tmp, "wb") as raw:
                out = HashingWriter(raw)
                files = pack(path, out, codec, level=level, on_bytes=advance)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        manifest = Manifest(
            name=name,
            archive=archive.rsplit("/", 1)[-1],
            codec=codec,
            kind="file" if path.is_file() else "dir",
            archive_sha256=out.sha.hexdigest(),
            archive_bytes=out.nbytes,
            files=files,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            lutq_version=__version__,
            source=path.name,
        )
        self._write_json(f"{name}.json", asdict(manifest))
        for other in CODECS.values():  # a re-push with another codec leaves no stale archive behind
            stale = self._path(f"{name}{other}")
            if stale != final and self.fs.exists(stale):
                self.fs.rm(stale)
        return manifest

    def pull(
        self, name: str, dest: str | os.PathLike[str] | None = None, *, force: bool = False, show_progress: bool = True
    ) -> Path:
        """Download artefact or shortcut `name` into `dest`, verify every checksum, then move it into place.

        An existing `dest` is replaced only after everything verified, and left as is when it already
        holds exactly the artefact's files (unless `force`).
        """
        name, default_dest = self.resolve(name)
        m = self.manifest(name)
        dest = Path(dest).expanduser() if dest is not None else default_dest
        if not force and matches(dest, m):
            return dest
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        archive = self._path(folder + m.archive)
        if not self.fs.exists(archive):
            raise LutqError(f"store {self.url}: manifest {name}.json names {m.archive}, which is missing")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if m.kind == "dir":
            if dest.exists() and not dest.is_dir():
                raise LutqError(f"store pull: {dest} exists and is not a directory")
            with atomic_dir(dest) as tmp:
                self._fetch_into(m, archive, folder + m.archive, tmp, show_progress)
            return dest
        if dest.is_dir():
            raise LutqError(f"store pull: {dest} is a directory; {name} is a single file")
        with scratch_dir(dest) as tmp:
            self._fetch_into(m, archive, folder + m.archive, tmp, show_progress)
            os.replace(tmp / next(iter(m.files)), dest)
        return dest

    def _fetch_into(self, m: Manifest, archive: str, rel: str, tmp: Path, show_progress: bool) -> None:
        where = self.url + ("" if self.url.endswith("/") else "/") + rel  # the archive's path, folder included
        with _bar(f"pull {m.name}", m.archive_bytes, show_progress) as advance, self.fs.open(archive, "rb") as raw:
            src = HashingReader(raw, advance)
            try:
                names = unpack(src, tmp, m.codec)
            except LutqError as e:
                raise LutqError(f"{where}: {e}") from e
            src.drain()
        if src.sha.hexdigest() != m.archive_sha256 or src.nbytes != m.archive_bytes:
            raise LutqError(f"{where}: archive checksum mismatch (corrupt or replaced); nothing was changed")
        if sorted(names) != sorted(m.files):
            raise LutqError(f"{where}: archive files differ from the manifest {m.name}.json")
        for rel, info in m.files.items():
            if sha256_file(tmp / rel) != info["sha256"]:
                raise LutqError(f"{where}: checksum mismatch for {rel}; nothing was changed")

    # -- shortcuts ----------------------------------------------------------------------------------
    def shortcuts(self) -> dict[str, Shortcut]:
        """The store's shortcut table (`shortcuts.json`)."""
        data = self._read_json(SHORTCUTS_FILE) or {}
        return {k: Shortcut(**v) for k, v in data.get("shortcuts", {}).items()}

    def alias(self, shortcut: str, name: str | None, *, dest: str | None = None) -> None:
        """Define (or with `name=None` remove) shortcut -> artefact `name`, with an optional default dest."""
        check_shortcut(shortcut)
        table = self.shortcuts()
        if name is None:
            if table.pop(shortcut, None) is None:
                raise LutqError(f"store {self.url}: no shortcut {shortcut!r}")
        else:
            self.manifest(name)  # must exist
            table[shortcut] = Shortcut(name=name, dest=dest)
        self._write_json(
            SHORTCUTS_FILE,
            {"format": "lutq-store-shortcuts", "shortcuts": {k: asdict(v) for k, v in sorted(table.items())}},
        )

    def resolve(self, name: str) -> tuple[str, Path]:
        """(artefact name, default destination) for a shortcut or a plain artefact name."""
        table = self.shortcuts()
        if name in table:
            return table[name].name, table[name].destination(name)
        if ":" in name:
            known = ", ".join(sorted(table)) or "none defined"
            raise LutqError(
                f"store {self.url}: unknown shortcut {name!r} (known: {known}); "
                f"define it with `lutq store alias {name} ARTEFACT`"
            )
        return check_name(name), Path(name.rsplit("/", 1)[-1])


def check_name(name: str) -> str:
    # fullmatch: `$` would accept a trailing newline; ".partial-" marks a push in progress (list() skips it)
    if not NAME_RE.fullmatch(name) or name == SHORTCUTS_FILE.removesuffix(".json") or ".partial-" in name:
        raise LutqError(f"invalid artefact name {name!r}: use letters, digits, ._- and '/' between parts")
    return name


def check_shortcut(shortcut: str) -> str:
    if not SHORTCUT_RE.fullmatch(shortcut):
        raise LutqError(f"invalid shortcut {shortcut!r}: use letters, digits, ._- and one ':' (e.g. cache:L64)")
    return shortcut


def matches(dest: Path, m: Manifest) -> bool:
    """True when `dest` already holds exactly the artefact's files (sizes first, then sha256)."""
    if not dest.exists() or (m.kind == "dir") != dest.is_dir():
        return False
    if m.kind == "file":
        ((_, info),) = m.files.items()
        return dest.stat().st_size == info["bytes"] and sha256_file(dest) == info["sha256"]
    try:
        have = {rel: p for rel, p in list_files(dest)}
    except LutqError:  # e.g. a symlinked directory: not the artefact's files
        return False
    if set(have) != set(m.files) or any(have[r].stat().st_size != i["bytes"] for r, i in m.files.items()):
        return False
    return all(sha256_file(have[r]) == i["sha256"] for r, i in m.files.items())


class _bar:
    """Context manager yielding an `advance(nbytes)` callback backed by lutq.core.progress (or a no-op)."""

    def __init__(self, label: str, total: int, show: bool) -> None:
        self.label, self.total, self.show = label, total, show
        self.p: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return None
        self.p = progress(transient=True).__enter__()
        task = self.p.add_task(self.label, total=max(self.total, 1))
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.__exit__(*exc)
