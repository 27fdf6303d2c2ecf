"""Core helpers: typed configs refuse unknown keys; atomic writes leave nothing half-written."""

from __future__ import annotations

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
