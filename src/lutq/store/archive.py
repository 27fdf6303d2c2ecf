"""Streaming `.tar.zst` / `.tar.lz4` packing with sha256 of the archive and of every file.

Nothing is held in memory whole: files are read in chunks into a streaming tar writer that feeds a
streaming compressor, and unpacking reads the compressed stream once, extracting as it goes.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lutq.core.errors import LutqError

CODECS = {"zst": ".tar.zst", "lz4": ".tar.lz4"}
CHUNK = 1 << 20


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise LutqError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    return codec


class HashingWriter:
    """Write-through wrapper that hashes and counts the bytes written."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None] | None = None) -> None:
        self.f, self.on_bytes = f, on_bytes
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        if self.on_bytes:
            self.on_bytes(len(b))
        return self.f.write(b) or len(b)

    def flush(self) -> None:
        self.f.flush()


class HashingReader:
    """Read-through wrapper that hashes and counts the bytes read."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None] | None = None) -> None:
        self.f, self.on_bytes = f, on_bytes
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.nbytes += len(b)
        if self.on_bytes and b:
            self.on_bytes(len(b))
        return b

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read (and hash) whatever the decompressor left unread."""
        while self.read(CHUNK):
            pass


def _compressor(codec: str, out: Any, level: int | None) -> Any:
    if codec == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1).stream_writer(
            out, closefd=False
        )
    import lz4.frame

    return lz4.frame.LZ4FrameFile(out, mode="wb", compression_level=0 if level is None else level)


def _decompressor(codec: str, src: Any) -> Any:
    if codec == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(src, closefd=False)
    import lz4.frame

    return lz4.frame.LZ4FrameFile(src, mode="rb")


def list_files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every regular file under `path` (or `path` itself), sorted."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for d in dirs:  # not walked (followlinks=False): an error rather than an artefact silently missing it
            if (Path(root) / d).is_symlink():
                raise LutqError(f"{Path(root) / d}: a symlink to a directory; push its target, or copy it in")
        for f in sorted(files):
            p = Path(root) / f
            if not p.is_file():
                raise LutqError(f"{p}: not a regular file (a broken symlink?); it cannot be packed")
            out.append((p.relative_to(path).as_posix(), p))
    return out


def pack(
    path: Path,
    out: BinaryIO,
    codec: str = "zst",
    *,
    level: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Stream `path` (a directory's contents, or one file) as a compressed tar into `out`.

    Returns {relative name: {"sha256", "bytes"}} for every file, hashed while it is read into the tar.
    """
    check_codec(codec)
    files: dict[str, dict[str, Any]] = {}
    comp = _compressor(codec, out, level)
    with tarfile.open(fileobj=comp, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, p in list_files(path):
            with open(p, "rb") as f:
                info = tar.gettarinfo(arcname=name, fileobj=f)  # fstat: a symlinked file is stored as its content
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                reader = HashingReader(f, on_bytes)
                tar.addfile(info, reader)
            if reader.nbytes != info.size:
                raise LutqError(f"{p}: file changed size while packing ({info.size} -> {reader.nbytes} bytes)")
            files[name] = {"sha256": reader.sha.hexdigest(), "bytes": reader.nbytes}
    comp.close()
    return files


def unpack(src: BinaryIO, dest: Path, codec: str) -> list[str]:
    """Extract a compressed tar stream into the existing directory `dest` (safe "data" filter).

    Returns the names of the extracted files. Raises LutqError on a corrupt stream.
    """
    check_codec(codec)
    names = []
    try:
        with _decompressor(codec, src) as dec, tarfile.open(fileobj=dec, mode="r|") as tar:
            for member in tar:
                tar.extract(member, dest, filter="data")
                if member.isfile():
                    names.append(member.name)
    except (tarfile.TarError, EOFError, OSError, RuntimeError, ValueError, _zstd_error()) as e:
        raise LutqError(f"corrupt or truncated archive ({type(e).__name__}: {e})") from e
    return names


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError
