"""Atomic writes: write to a temporary sibling, then rename, so a crash never leaves a half-written file
or directory where a good one was."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file `.NAME.PID.*.tmp` in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named for the writer's PID, so what a killed writer leaves is found later (`remove_stale_scratch_in`); not
    # swept here: one directory listing per write grows with the directory (8.4 ms per write next to 8,000 shards)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by all, as open() would make it (mkstemp makes 0600): caches are shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON (indented, sorted keys off) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the OS, libc
    or file system cannot. Hand-rolled with ctypes: the standard library has no atomic exchange."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_scratch(path: Path) -> None:
    """Remove the scratch files and directories that killed processes left next to `path`: `.NAME.PID.*.tmp` (this
    module's, `lutq.data.tokens`') and `.NAME.PID.*.raw`, whose process PID no longer runs (those of running
    processes are kept)."""
    _remove_dead_scratch(path.parent, re.escape(path.name))


def remove_stale_scratch_in(directory: Path) -> None:
    """`remove_stale_scratch` for every name in `directory` at once (one listing): what a job that writes many
    files there (a KD cache's shards) calls once when it starts or resumes."""
    _remove_dead_scratch(Path(directory), r".+")


def _remove_dead_scratch(directory: Path, name: str) -> None:
    scratch = re.compile(rf"\.{name}\.(\d+)\.[^.]*\.(tmp|raw)")
    for entry in directory.iterdir():
        if (m := scratch.fullmatch(entry.name)) and not _pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _recover(path: Path) -> None:
    """Undo what a killed `atomic_dir` on `path` left: the old directory parked as `.NAME.old-PID` when the kill
    came between its two renames (restored if `path` is missing, else removed once its process is gone), and
    stale scratch (`remove_stale_scratch`)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.old-(\d+)")
    parked = [(e, int(m.group(1))) for e in path.parent.iterdir() if (m := pattern.fullmatch(e.name))]
    for entry, pid in sorted(parked, key=lambda p: p[0].stat().st_mtime, reverse=True):  # newest restored first
        if not path.exists():
            os.replace(entry, path)
        elif not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
    remove_stale_scratch(path)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory next to `path` (the same file system, so what is built in it can be renamed onto
    `path`), removed on exit; what killed processes left for the same `path` is put right first (`_recover`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` as a whole.

    On an exception the temporary directory is removed and an existing `path` is left untouched. The swap is one
    atomic exchange where the OS allows it (Linux), else two renames; what a kill leaves behind is put right by
    the next `atomic_dir` on the same path. The result is readable by all (mode 0755), like `mkdir`'s default.
    """
    path = Path(path)
    with scratch_dir(path) as tmp:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        yield tmp
        tmp.chmod(0o755)
        if not (path.exists() and _exchange(tmp, path)):  # exchanged: tmp holds the old directory, removed on exit
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)


def check_replaceable(
    out: str | os.PathLike[str],
    *,
    what: str,
    is_ours: Callable[[Path], bool],
    inputs: Iterable[str | os.PathLike[str]] = (),
    may_be_input: bool = False,
    input_what: str = "input",
) -> None:
    """Refuse, before any work, an OUT that a command writing a whole directory (`atomic_dir`) must not replace.

    OUT may be new, an empty directory, or `what` (`is_ours(OUT)`: a previous output of the same kind, replaced
    on success). It may never be a file, a non-empty directory of anything else, or a directory holding one of
    the `inputs`; nor an input itself unless `may_be_input` (an in-place rewrite of a checkpoint)."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise LutqError(f"{out}: exists and is not a directory; choose another OUT")
    dst = out.resolve()
    for src in inputs:
        if not Path(src).exists():
            continue
        src_path = Path(src).resolve()
        if dst in src_path.parents or (dst == src_path and not may_be_input):
            raise LutqError(
                f"{out}: is or holds the {input_what} {src}, which writing OUT would delete; choose another OUT"
            )
    if any(out.iterdir()) and not is_ours(out):
        raise LutqError(
            f"{out}: exists, is not empty and is not {what}; writing OUT replaces the whole directory: remove it "
            "or choose another OUT"
        )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
