"""Audit of the artefact store: file:// and memory:// remotes, re-pushes, SIGKILLed pushes and pulls, and the
defects found: names with a trailing newline or a `.partial-` part, malformed manifests, symlinked directories
silently left out, shortcut output eaten by rich, an alias checked only after the push, a store at the root of
an fsspec filesystem, error messages naming the wrong archive path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.store import Store


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def artefact(tmp_path: Path) -> Path:
    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}\n')
    (d / "sub" / "w.bin").write_bytes(os.urandom(50_000))
    return d


def test_file_url_round_trip_and_repush_replaces(tmp_path: Path, artefact: Path) -> None:
    store = Store(f"file://{tmp_path / 'st'}")
    store.push("caches/c_L64", artefact, show_progress=False)
    store.alias("cache:L64", "caches/c_L64")
    dest = store.pull("cache:L64", tmp_path / "d", show_progress=False)
    assert _tree(dest) == _tree(artefact) and [m.name for m in store.list()] == ["caches/c_L64"]
    (artefact / "config.json").write_text('{"a": 2}\n')  # push over the existing artefact, same codec
    m = store.push("caches/c_L64", artefact, show_progress=False)
    assert Store(f"file://{tmp_path / 'st'}").manifest("caches/c_L64").archive_sha256 == m.archive_sha256
    assert _tree(store.pull("cache:L64", dest, show_progress=False)) == _tree(artefact)
    assert sorted(p.name for p in (tmp_path / "st" / "caches").iterdir()) == ["c_L64.json", "c_L64.tar.zst"]


def test_odd_names_are_refused(tmp_path: Path, artefact: Path) -> None:
    store = Store(str(tmp_path / "st"))
    store.push("ok", artefact, show_progress=False)
    for name in ("abc\n", "caches/x\n", "x.partial-1", "a/b.tar.zst.partial-1234abcd", "a b", "../x", "a//b"):
        with pytest.raises(LutqError, match="invalid artefact name"):
            store.push(name, artefact, show_progress=False)
    for shortcut in ("cache:L64\n", "a:b:c", "cache:"):
        with pytest.raises(LutqError, match="invalid shortcut"):
            store.alias(shortcut, "ok")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["ok.json", "ok.tar.zst"]
    assert store.shortcuts() == {}


@pytest.mark.parametrize("edit", ["no-sha", "list", "files-list", "kind", "archive", "two-files"])
def test_malformed_manifest_is_a_clear_error(tmp_path: Path, artefact: Path, edit: str) -> None:
    store = Store(str(tmp_path / "st"))
    store.push("x", artefact if edit != "two-files" else artefact / "config.json", show_progress=False)
    path = tmp_path / "st" / "x.json"
    data = json.loads(path.read_text())
    if edit == "no-sha":
        del data["files"]["config.json"]["sha256"]
    elif edit == "list":
        data = [data]
    elif edit == "files-list":
        data["files"] = list(data["files"])
    elif edit == "kind":
        data["kind"] = "tree"
    elif edit == "archive":
        data["archive"] = "../x.tar.zst"
    else:  # a single-file artefact with two files
        data["files"]["other"] = data["files"]["config.json"]
    path.write_text(json.dumps(data))
    dest = tmp_path / "dest"
    with pytest.raises(LutqError, match="x.json"):
        store.pull("x", dest, show_progress=False)
    assert not dest.exists()
    assert store.list() == []  # skipped with a warning naming it (it used to crash list, or pull half-way)


def test_symlinked_directory_or_broken_link_is_not_silently_dropped(tmp_path: Path, artefact: Path) -> None:
    store = Store(str(tmp_path / "st"))
    (artefact / "linked").symlink_to(artefact / "sub", target_is_directory=True)
    with pytest.raises(LutqError, match="linked.*symlink to a directory"):
        store.push("x", artefact, show_progress=False)
    (artefact / "linked").unlink()
    (artefact / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LutqError, match="dangling.*not a regular file"):
        store.push("x", artefact, show_progress=False)
    assert store.list() == []
    (artefact / "dangling").unlink()
    store.push("x", artefact, show_progress=False)
    dest = store.pull("x", tmp_path / "d", show_progress=False)
    (dest / "dangling").symlink_to(tmp_path / "nowhere")  # a destination that does not match is replaced
    assert _tree(store.pull("x", dest, show_progress=False)) == _tree(artefact) and not (dest / "dangling").is_symlink()


def test_cli_pull_prints_the_shortcut_verbatim(tmp_path: Path, artefact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ckpt:x:` is rich emoji syntax: `lutq pull ckpt:x` printed "ckpt❌ ..."."""
    from lutq.cli import app

    monkeypatch.chdir(tmp_path)
    url = str(tmp_path / "st")
    r = CliRunner()
    assert r.invoke(app, ["store", "push", "runs/x", str(artefact), "--alias", "ckpt:x", "--store", url]).exit_code == 0
    res = r.invoke(app, ["pull", "ckpt:x", "--store", url])
    assert res.exit_code == 0, res.output
    assert "ckpt:x: checkpoints/x" in res.output and "❌" not in res.output
    res = r.invoke(app, ["store", "pull", "ckpt:x", "--dest", "a/[b]", "--store", url])
    assert res.exit_code == 0 and "ckpt:x: a/[b]" in res.output and _tree(tmp_path / "a" / "[b]") == _tree(artefact)


def test_cli_push_checks_the_alias_before_pushing(tmp_path: Path, artefact: Path) -> None:
    from lutq.cli import app

    url = str(tmp_path / "st")
    res = CliRunner().invoke(app, ["store", "push", "big", str(artefact), "--alias", "bad alias", "--store", url])
    assert res.exit_code != 0 and "invalid shortcut" in str(res.exception)
    assert Store(url).list() == []  # nothing was pushed


def test_store_at_the_root_of_a_memory_filesystem(tmp_path: Path, artefact: Path) -> None:
    """`memory://` (no name): files at the filesystem root; "x.json" must not become a directory."""
    import fsspec

    fs = fsspec.filesystem("memory")
    name = f"audit{uuid.uuid4().hex[:8]}"
    try:
        store = Store("memory://")
        store.push(name, artefact, show_progress=False)
        store.alias("cache:" + name, name)
        assert fs.isfile(f"/{name}.json")
        assert _tree(store.pull("cache:" + name, tmp_path / "d", show_progress=False)) == _tree(artefact)
        assert name in [m.name for m in store.list()]
    finally:
        for p in (f"/{name}.json", f"/{name}.tar.zst", "/shortcuts.json"):
            if fs.exists(p):
                fs.rm(p, recursive=True)


def test_corrupt_archive_error_names_its_real_path(tmp_path: Path, artefact: Path) -> None:
    store = Store(str(tmp_path / "st"))
    store.push("caches/c", artefact, show_progress=False)
    archive = tmp_path / "st" / "caches" / "c.tar.zst"
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(LutqError, match=r"/caches/c\.tar\.zst: "):
        store.pull("caches/c", tmp_path / "d", show_progress=False)


KILLER = r"""
import os, signal, sys
import lutq.store.archive as archive
mode, after = sys.argv[1], int(sys.argv[2])
cls = archive.HashingWriter if mode == "push" else archive.HashingReader
name = "write" if mode == "push" else "read"
orig, seen = getattr(cls, name), [0]
def counted(self, *a):
    r = orig(self, *a)
    seen[0] += len(a[0]) if mode == "push" else len(r)
    if seen[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return r
setattr(cls, name, counted)
from lutq.cli import main
sys.argv = ["lutq", *sys.argv[3:]]
main()
"""


def test_sigkill_mid_push_and_mid_pull(tmp_path: Path, artefact: Path) -> None:
    """A push killed mid-stream leaves the old artefact intact (and hidden partials); a pull killed mid-stream
    leaves the destination untouched; the same pull again completes."""
    url = str(tmp_path / "st")
    store = Store(url)
    store.push("caches/c", artefact, codec="lz4", show_progress=False)
    old = _tree(artefact)
    (artefact / "sub" / "w.bin").write_bytes(os.urandom(400_000))  # incompressible: many writes
    (tmp_path / "killer.py").write_text(KILLER)

    def killed(*args: str) -> int:
        cmd = [sys.executable, str(tmp_path / "killer.py"), *args, "--store", url]
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode

    assert killed("push", "100000", "store", "push", "caches/c", str(artefact)) == -9
    assert [m.name for m in Store(url).list()] == ["caches/c"]
    assert _tree(store.pull("caches/c", tmp_path / "a", show_progress=False)) == old
    store.push("caches/c", artefact, show_progress=False)

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine").write_text("keep")
    assert killed("pull", "100000", "store", "pull", "caches/c", "--dest", str(dest)) == -9
    assert _tree(dest) == {"mine": b"keep"}
    assert _tree(store.pull("caches/c", dest, show_progress=False)) == _tree(artefact)
