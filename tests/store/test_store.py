"""Artefact store: round trips (local dir, memory://), both codecs, shortcuts, corruption handling."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lutq.core.errors import LutqError
from lutq.store import Manifest, Store


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def artefact(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "trainer_state").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}\n')
    (d / "model.safetensors").write_bytes(os.urandom(300_000) + b"\0" * 200_000)
    (d / "trainer_state" / "state.pt").write_bytes(os.urandom(1234))
    (d / "tokenizer.json").symlink_to(d / "config.json")  # symlinked files are stored as their content
    return d


@pytest.fixture
def memory_url() -> str:
    url = f"memory://lutq-test-{uuid.uuid4().hex[:8]}"
    yield url
    import fsspec

    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("codec", ["zst", "lz4"])
def test_round_trip_local_dir(tmp_path: Path, artefact: Path, codec: str) -> None:
    store = Store(str(tmp_path / "store"))
    m = store.push("runs/q2_best", artefact, codec=codec, show_progress=False)
    assert m.kind == "dir" and sorted(m.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state/state.pt",
    ]
    assert (tmp_path / "store" / "runs" / f"q2_best.tar.{codec}").is_file()
    assert m.archive_bytes < m.total_bytes  # the zero half compresses
    out = store.pull("runs/q2_best", tmp_path / "out", show_progress=False)
    assert _tree(out) == _tree(artefact) and not (out / "tokenizer.json").is_symlink()
    assert [x.name for x in store.list()] == ["runs/q2_best"]


def test_round_trip_memory_url_and_single_file(tmp_path: Path, artefact: Path, memory_url: str) -> None:
    store = Store(memory_url)
    store.push("L64", artefact)
    store.push("weights", artefact / "model.safetensors", codec="lz4")
    assert [m.name for m in store.list()] == ["L64", "weights"]
    out = store.pull("L64", tmp_path / "a", show_progress=False)
    assert _tree(out) == _tree(artefact)
    f = store.pull("weights", tmp_path / "w.safetensors", show_progress=False)
    assert f.read_bytes() == (artefact / "model.safetensors").read_bytes()
    # a second Store object on the same URL sees the same artefacts (nothing kept in the object)
    assert Store(memory_url).manifest("L64").archive == "L64.tar.zst"


def test_repush_with_other_codec_replaces_archive(tmp_path: Path, artefact: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.push("x", artefact, show_progress=False)
    store.push("x", artefact, codec="lz4", show_progress=False)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["x.json", "x.tar.lz4"]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["zst", "lz4"])
def test_corrupt_archive_leaves_destination_untouched(tmp_path: Path, artefact: Path, codec: str) -> None:
    store = Store(str(tmp_path / "store"))
    store.push("ck", artefact, codec=codec, show_progress=False)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    _corrupt(tmp_path / "store" / f"ck.tar.{codec}")
    with pytest.raises(LutqError, match=r"ck\.tar\.(zst|lz4).*(corrupt|checksum)"):
        store.pull("ck", dest, show_progress=False)
    assert _tree(dest) == {"keep.txt": b"precious"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []  # no temp left behind


def test_tampered_file_checksum_detected(tmp_path: Path, artefact: Path) -> None:
    """A manifest whose per-file hash does not match the (intact) archive is refused too."""
    store = Store(str(tmp_path / "store"))
    store.push("ck", artefact, show_progress=False)
    mpath = tmp_path / "store" / "ck.json"
    data = json.loads(mpath.read_text())
    data["files"]["config.json"]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(data))
    with pytest.raises(LutqError, match="checksum mismatch for config.json"):
        store.pull("ck", tmp_path / "dest", show_progress=False)
    assert not (tmp_path / "dest").exists()


def test_pull_skips_matching_dest_and_replaces_stale(tmp_path: Path, artefact: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.push("ck", artefact, show_progress=False)
    dest = store.pull("ck", tmp_path / "d", show_progress=False)
    (dest / "extra").write_text("stale")
    store.pull("ck", dest, show_progress=False)  # differs -> replaced as a whole
    assert _tree(dest) == _tree(artefact)
    ino = (dest / "config.json").stat().st_ino
    store.pull("ck", dest, show_progress=False)  # matches -> untouched
    assert (dest / "config.json").stat().st_ino == ino


def test_shortcuts_and_errors(tmp_path: Path, artefact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUTQ_STORE", str(tmp_path / "envstore"))
    store = Store()
    assert store.url == str(tmp_path / "envstore")
    store.push("caches/sharegpt_L64", artefact, show_progress=False)
    store.alias("cache:L64", "caches/sharegpt_L64")
    store.alias("ckpt:best", "caches/sharegpt_L64", dest="somewhere/else")
    assert store.resolve("cache:L64") == ("caches/sharegpt_L64", Path("caches/sharegpt_L64"))
    out = store.pull("cache:L64", show_progress=False)
    assert out == Path("caches/sharegpt_L64") and _tree(out) == _tree(artefact)
    assert store.resolve("ckpt:best")[1] == Path("somewhere/else")
    with pytest.raises(LutqError, match=r"unknown shortcut 'ckpt:nope' \(known: cache:L64, ckpt:best\)"):
        store.pull("ckpt:nope")
    with pytest.raises(LutqError, match="no artefact 'missing'.*have: caches/sharegpt_L64"):
        store.pull("missing")
    with pytest.raises(LutqError, match="no artefact"):
        store.alias("cache:x", "missing")
    with pytest.raises(LutqError, match="invalid artefact name"):
        store.push("../evil", artefact)
    with pytest.raises(LutqError, match="does not exist"):
        store.push("ok", tmp_path / "nope")
    store.alias("ckpt:best", None)
    assert sorted(store.shortcuts()) == ["cache:L64"]
    with pytest.raises(LutqError, match="not a lutq store manifest"):
        Manifest.from_dict({"format": "x"}, "f.json")


def test_cli_push_list_alias_pull(tmp_path: Path, artefact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lutq.cli import app

    monkeypatch.chdir(tmp_path)
    url = str(tmp_path / "clistore")
    r = CliRunner()
    res = r.invoke(
        app, ["store", "push", "q2_init", str(artefact), "--codec", "lz4", "--alias", "ckpt:q2_init", "--store", url]
    )
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["store", "list", "--store", url])
    assert res.exit_code == 0 and "q2_init" in res.output
    res = r.invoke(app, ["pull", "ckpt:q2_init", "--store", url])
    assert res.exit_code == 0, res.output
    assert _tree(tmp_path / "checkpoints" / "q2_init") == _tree(artefact)
