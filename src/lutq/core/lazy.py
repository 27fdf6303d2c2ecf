"""Lazy package exports (PEP 562), so that importing a stage package for its CLI commands does not import
torch: `lutq --help` and argument errors answer without loading it.

    __getattr__, __dir__ = lazy_exports(__name__, {"KDCache": "lutq.kd.reader", ...})

A name is imported from its module on first access (then cached on the package); any other attribute is
tried as a submodule, as `import lutq.kd.cache` would have made it one. An exported function named like its
own module (`lutq.evaluate.compare`, `lutq.evaluate.perplexity`) stays the function: importing the submodule
does not rebind the package attribute to the module, as it would without the eager `from ... import`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _LazyPackage(ModuleType):
    _lazy_names: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._lazy_names and isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return  # the import system binding submodule `name`: the exported object of that name wins
        super().__setattr__(name, value)


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(module __getattr__, module __dir__) for `package`, exporting each name from its module on demand."""
    module_obj = sys.modules[package]
    module_obj.__class__ = _LazyPackage
    module_obj._lazy_names = frozenset(names)

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            try:
                value: Any = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
