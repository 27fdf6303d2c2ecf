"""Core helpers: typed configs refuse unknown keys; atomic writes leave nothing half-written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lutq.core import ConfigBase, LutqError, atomic_dir, atomic_write_json, lutq_home
from lutq.testing import dead_pid


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


@dataclass
class Typed(ConfigBase):
    flag: bool = False
    mode: str = "all"
    kind: str | None = None
    steps: int | None = None
    pair: tuple[int, int] = (1, 2)
    table: dict[str, int] = field(default_factory=dict)


@pytest.mark.parametrize(
    ("data", "where", "expected"),
    [
        ({"lr": "1e-3"}, "lr", "a number"),
        ({"lr": True}, "lr", "a number"),
        ({"inner": {"rank": 1.5}}, "inner.rank", "an integer"),
        ({"inner": {"rank": "4"}}, "inner.rank", "an integer"),
        ({"inner": 4}, "inner", "a table of Inner settings"),
        ({"sizes": 3}, "sizes", "a list"),
        ({"sizes": [1, "2"]}, r"sizes\[1\]", "an integer"),
        ({"name": 3}, "name", "a string"),
    ],
)
def test_config_refuses_wrong_types_naming_file_and_key(tmp_path: Path, data, where, expected) -> None:
    with pytest.raises(LutqError, match=rf"^cfg\.toml\.{where}: expected {expected}, got"):
        Outer.from_dict(data, source="cfg.toml")


def test_config_type_checks_flags_optionals_and_fixed_tuples() -> None:
    for data, msg in [
        ({"flag": "yes"}, "flag: expected true or false"),
        ({"flag": 1}, "flag: expected true or false"),
        ({"steps": 2.5}, "steps: expected an integer"),
        ({"pair": [1]}, "pair: expected 2 values"),
        ({"table": [1]}, "table: expected a table"),
    ]:
        with pytest.raises(LutqError, match=msg):
            Typed.from_dict(data, source="t")
    ok = Typed.from_dict({"flag": True, "mode": Path("p"), "kind": None, "steps": 3, "pair": [3, 4], "table": {}})
    assert (ok.flag, ok.mode, ok.kind, ok.steps, ok.pair) == (True, "p", None, 3, (3, 4))


def test_a_check_after_parsing_names_the_file(tmp_path: Path) -> None:
    from lutq.quant.presets import QuantConfig

    (tmp_path / "q.toml").write_text('mode = "latnet"\n')
    with pytest.raises(LutqError, match=r"q\.toml: QuantConfig\.mode must be 'frozen' or 'latent'"):
        QuantConfig.from_file(tmp_path / "q.toml")


def test_a_partial_nested_table_keeps_the_other_defaults() -> None:
    from lutq.quant.presets import QuantConfig

    # [mlp] lut_kind = "kmeans" alone: the MLP stays QuantConfig's 4 entries at rank 32 (was LayerSpec's 16 / 4)
    cfg = QuantConfig.from_dict({"mlp": {"lut_kind": "kmeans"}}, source="q.toml")
    assert (cfg.mlp.lut_size, cfg.mlp.rank, cfg.mlp.lut_kind) == (4, 32, "kmeans")
    assert Outer.from_dict({"inner": {}}).inner.rank == 4


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
    target, dead = tmp_path / "ckpt", dead_pid()
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


def test_what_killed_writers_left_is_removed_once_per_job(tmp_path: Path) -> None:
    from lutq.core.atomic import atomic_write_bytes, remove_stale_scratch_in

    dead = dead_pid()
    stale = tmp_path / f".shard.bin.{dead}.x1y2.tmp"  # a SIGKILL in the middle of writing shard.bin
    stale.write_bytes(b"\0" * 100)
    other = tmp_path / f".other.bin.{dead}.x1y2.tmp"  # another file's, same dead writer
    other.write_bytes(b"")
    live = tmp_path / f".shard.bin.{os.getpid()}.live.tmp"  # another writer of this process, still running
    live.write_bytes(b"")
    atomic_write_bytes(tmp_path / "shard.bin", b"data")  # a write stays O(1): it lists nothing
    assert (tmp_path / "shard.bin").read_bytes() == b"data" and stale.exists()
    remove_stale_scratch_in(tmp_path)  # what a job (a KD cache build) calls once when it starts or resumes
    assert not stale.exists() and not other.exists() and live.exists()
    assert (tmp_path / "shard.bin").read_bytes() == b"data"


def test_spaced_indices_stay_inside_long_arrays() -> None:
    from lutq.core.digest import spaced_indices

    idx = spaced_indices(28_311_552, 4096)  # SmolLM2's embedding: a float32 linspace ended one past it
    assert idx[0] == 0 and idx[-1] == 28_311_551 and len(idx) == 4096 and (idx[1:] > idx[:-1]).all()
    assert spaced_indices(5, 4096).tolist() == [0, 1, 2, 3, 4] and spaced_indices(0, 8).size == 0
