"""The typed-config pattern every stage uses: a dataclass with dict/JSON/TOML round trips that refuses
unknown keys (a typo in a recipe is an error, not a silently ignored setting)."""

from __future__ import annotations

import dataclasses
import json
import numbers
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
            default = _default(names[key])
            if isinstance(value, dict) and isinstance(default, ConfigBase) and type(default) is hints.get(key):
                value = {**default.to_dict(), **value}  # a partial table changes only the keys it names
            kwargs[key] = _coerce(hints.get(key), value, f"{source}.{key}")
        try:
            return cls(**kwargs)
        except LutqError as e:  # a check in __post_init__: say which file (or dict) the values came from
            if str(e).startswith(source):
                raise
            raise LutqError(f"{source}: {e}") from e

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
    """`value` (from TOML / JSON / a dict) as the field's type `hint`, or a LutqError naming `where` (file.key):
    a string where a number belongs, a float for an int, a number for a flag are mistakes, not settings."""
    if hint is None or hint is Any or value is None:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except LutqError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise LutqError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise LutqError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return hint.from_dict(value, source=where)
        raise LutqError(f"{where}: expected a table of {hint.__name__} settings, got {value!r}")
    if hint is bool:
        return _expect(value, isinstance(value, bool), "true or false", where)
    if hint is int:
        return _expect(value, isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer", where)
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return float(_expect(value, ok, "a number", where))
    if hint is str:
        return str(_expect(value, isinstance(value, str | Path), "a string", where))
    if hint is Path:
        return Path(_expect(value, isinstance(value, str | Path), "a path (string)", where))
    if origin in (tuple, list):
        _expect(value, isinstance(value, list | tuple), "a list", where)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise LutqError(f"{where}: expected {len(args)} values, got {value!r}")
            items = [_coerce(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(args, value, strict=True))]
        else:
            items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return _expect(value, isinstance(value, dict), "a table", where)
    return value


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _expect(value: Any, ok: bool, what: str, where: str) -> Any:
    if not ok:
        raise LutqError(f"{where}: expected {what}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
