"""The typed-config pattern every stage uses: a dataclass with dict/JSON/TOML round trips that refuses
unknown keys (a typo in a recipe is an error, not a silently ignored setting)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Self

from lutq.core.errors import LutqError


@dataclasses.dataclass
class ConfigBase:
    """Base for stage configs: `Cfg.from_dict(d)`, `cfg.to_dict()`, `Cfg.from_file(path)`, `cfg.replace(**kw)`."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Self:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise LutqError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _coerce(hints.get(key), value, f"{source}.{key}")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, *, section: str | None = None) -> Self:
        path = Path(path)
        if not path.is_file():
            raise LutqError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise LutqError(f"{path}: cannot parse ({e})") from e
        if section is not None:
            data = data.get(section, {})
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if isinstance(hint, type) and issubclass(hint, ConfigBase) and isinstance(value, dict):
        return hint.from_dict(value, source=where)
    if hint is Path:
        return Path(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
