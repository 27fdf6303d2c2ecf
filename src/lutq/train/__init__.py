"""KD-QAT training: `train(TrainConfig) -> TrainResult`, run directories, schedule, plots, recipes.

Names resolve lazily so `lutq --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "lutq.train.config",
    "train": "lutq.train.trainer",
    "TrainResult": "lutq.train.trainer",
    "build_student": "lutq.train.trainer",
    "RunDir": "lutq.train.run_dir",
    "lr_factor": "lutq.train.schedule",
    "make_scheduler": "lutq.train.schedule",
    "plot_runs": "lutq.train.plot",
    "ProgressiveConfig": "lutq.train.recipes",
    "ProgressiveResult": "lutq.train.recipes",
    "progressive": "lutq.train.recipes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lutq.train' has no attribute {name!r}")
