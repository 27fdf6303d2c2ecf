"""Core helpers: typed configs refuse unknown keys; atomic writes leave nothing half-written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lutq.core import ConfigBase, LutqError, atomic_dir, atomic_write_json, lutq_home


@dataclass
class Inner(ConfigBase):
    rank: int = 4


@dataclass
class Outer(ConfigBase):
    name: str = "x"
    lr: float = 1e-3
    out: Path | None = None
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)


def test_config_round_trip_and_coercion(tmp_path: Path) -> None:
    cfg = Outer.from_dict({"lr": 1, "out": "a/b", "inner": {"rank": 8}, "sizes": [3]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.out == Path("a/b") and cfg.inner.rank == 8 and cfg.sizes == (3,)
    assert Outer.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.toml").write_text('name = "t"\n[inner]\nrank = 2\n')
    assert Outer.from_file(tmp_path / "c.toml").inner.rank == 2
    assert cfg.replace(name="y", lr=None).name == "y"


def test_config_refuses_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(LutqError, match=r"unknown key\(s\) \['lr_typo'\]"):
        Outer.from_dict({"lr_typo": 1})
    with pytest.raises(LutqError, match="inner"):
        Outer.from_dict({"inner": {"rnak": 1}})
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(LutqError, match="cannot parse"):
        Outer.from_file(tmp_path / "bad.toml")
    with pytest.raises(LutqError, match="not found"):
        Outer.from_file(tmp_path / "missing.toml")


def test_atomic_dir_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise ValueError("crash mid-write")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_atomic_write_json(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "x.json", {"p": Path("q")})
    assert (tmp_path / "x.json").read_text().strip() == '{\n  "p": "q"\n}'


def test_lutq_home_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path / "h"))
    assert lutq_home() == tmp_path / "h" and (tmp_path / "h").is_dir()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (pids are not reused this quickly)


def test_atomic_dir_swaps_in_one_step_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    import lutq.core.atomic as atomic

    target = tmp_path / "ckpt"
    for fallback in (False, True):  # renameat2 exchange (Linux), then the two-rename path
        if fallback:
            monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        for text in ("one", "two"):
            with atomic_dir(target) as tmp:
                (tmp / "f").write_text(text)
            assert (target / "f").read_text() == text
            assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
            assert target.stat().st_mode & 0o777 == 0o755  # readable by all, not mkdtemp's 0700
    assert atomic_write_json(tmp_path / "m.json", {}).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_dir_puts_right_what_a_kill_left(tmp_path: Path) -> None:
    target, dead = tmp_path / "ckpt", _dead_pid()
    parked = tmp_path / f".ckpt.old-{dead}"  # killed between its two renames: the old dir parked, no target
    parked.mkdir()
    (parked / "f").write_text("old")
    stale = tmp_path / f".ckpt.{dead}.abcd.tmp"  # killed while writing
    stale.mkdir()
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        raise ValueError("fail after the recovery")
    assert (target / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    mine = tmp_path / f".ckpt.{os.getpid()}.live.tmp"  # a live process's scratch dir is never touched
    mine.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new" and mine.is_dir()
