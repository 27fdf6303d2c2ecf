"""Optional experiment trackers (wandb, trackio, tensorboard), imported only when asked for."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lutq.core.errors import LutqError

_PACKAGES = {"wandb": "wandb", "trackio": "trackio", "tensorboard": "torch.utils.tensorboard"}


def _import(name: str) -> Any:
    try:
        return importlib.import_module(_PACKAGES[name])
    except ImportError as e:
        raise LutqError(f"logger {name!r} needs its package: pip install 'lutq[{name}]' ({e})") from e


def check_available(names: tuple[str, ...] | list[str]) -> None:
    """Import each requested tracker now: an unknown or missing one is a one-line LutqError before a run starts
    (building and quantizing the student can take minutes)."""
    for name in names:
        if name not in _PACKAGES:
            raise LutqError(f"unknown logger {name!r}; choose from {', '.join(_PACKAGES)}")
        _import(name)


class Trackers:
    """Fan-out of numeric metrics to the requested trackers; a no-op when none were requested."""

    def __init__(
        self,
        names: tuple[str, ...] | list[str],
        *,
        run_dir: Path,
        project: str,
        config: dict[str, Any],
        resume: bool = False,
    ) -> None:
        self._sinks: list[tuple[str, Any]] = []
        for name in names:
            if name not in _PACKAGES:
                raise LutqError(f"unknown logger {name!r}; choose from {', '.join(_PACKAGES)}")
            module = _import(name)
            self._sinks.append((name, self._open(name, module, run_dir, project, config, resume)))

    @staticmethod
    def _open(name: str, module: Any, run_dir: Path, project: str, config: dict[str, Any], resume: bool) -> Any:
        run_name = run_dir.name
        if name == "wandb":
            return module.init(
                project=project,
                name=run_name,
                config=config,
                dir=str(run_dir),
                id=run_name,
                resume="allow" if resume else None,
            )
        if name == "trackio":
            return module.init(project=project, name=run_name, config=config, resume="allow" if resume else "never")
        return module.SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any], step: int) -> None:
        """Log the numeric entries of `row` at `step` (train/... and eval/... namespaces)."""
        if not self._sinks:
            return
        metrics = {
            _key(k): float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        for name, sink in self._sinks:
            if name == "tensorboard":
                for k, v in metrics.items():
                    sink.add_scalar(k, v, step)
            else:
                sink.log(metrics, step=step)

    def close(self) -> None:
        for name, sink in self._sinks:
            if name == "tensorboard":
                sink.close()
            else:
                sink.finish()
        self._sinks = []


def _key(column: str) -> str:
    if column.startswith("eval_"):
        return "eval/" + column[len("eval_") :]
    return "train/" + column
