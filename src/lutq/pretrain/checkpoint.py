"""Pretraining checkpoints, in the lutq checkpoint directory layout (not a pickled model):

    config.json         format "lutq-pretrain" + version, the ModelConfig, weights sha256/bytes, extra
    model.safetensors   the decoder's state dict (tied lm head = embedding, stored once)
    tokenizer files     when the tokenizer is known
    trainer_state/      optimizer, RNG, step, tokens, best val loss (`lutq.models.save_trainer_state`)

Written as a whole with `lutq.core.atomic_dir`, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lutq import __version__
from lutq.core.atomic import atomic_dir, atomic_write_json, sha256_file
from lutq.core.errors import LutqError
from lutq.core.formats import read_versioned_json
from lutq.models import save_trainer_state
from lutq.pretrain.model import GPT, ModelConfig

FORMAT = "lutq-pretrain"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def save_pretrain_checkpoint(
    path: str | os.PathLike[str],
    model: GPT,
    *,
    tokenizer: Any = None,
    trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (+ tokenizer, + trainer state) to the directory `path`, atomically."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            save_trainer_state(tmp, trainer_state)
        atomic_write_json(
            tmp / "config.json",
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "lutq_version": __version__,
                "architecture": "lutq-gpt",
                "model": model.config.to_dict(),
                "weights": {
                    "file": WEIGHTS,
                    "sha256": sha256_file(tmp / WEIGHTS),
                    "bytes": (tmp / WEIGHTS).stat().st_size,
                },
                "extra": extra or {},
            },
        )
    return path


def read_pretrain_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json of a pretraining checkpoint; errors name the file and the problem."""
    path = Path(path)
    return read_versioned_json(
        path / "config.json", format=FORMAT, max_version=FORMAT_VERSION, what="lutq pretraining checkpoint"
    )


def read_weights(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against the size and sha256 recorded in config.json."""
    path = Path(path)
    cfg = read_pretrain_config(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise LutqError(f"{wpath}: missing (incomplete checkpoint)")
    expected = cfg.get("weights", {})
    if expected.get("bytes") is not None and wpath.stat().st_size != expected["bytes"]:
        raise LutqError(f"{wpath}: {wpath.stat().st_size} bytes, config.json says {expected['bytes']}")
    if verify and expected.get("sha256") and sha256_file(wpath) != expected["sha256"]:
        raise LutqError(f"{wpath}: sha256 mismatch with config.json (corrupt file)")
    try:
        return load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LutqError(f"{wpath}: corrupt safetensors file ({e})") from e


def load_weights_into(model: GPT, path: str | os.PathLike[str]) -> None:
    """Copy a checkpoint's tensors into `model` (keeping the model's dtypes); strict name/shape check."""
    tensors = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LutqError(
            f"{Path(path) / WEIGHTS}: tensors do not match the model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise LutqError(
                f"{Path(path) / WEIGHTS}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors, strict=True)


def load_pretrain_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[GPT, dict[str, Any]]:
    """(float32 model in eval mode, config.json) of a pretraining checkpoint directory."""
    cfg = read_pretrain_config(path)
    model = GPT(ModelConfig.from_dict(cfg["model"], source=str(Path(path) / "config.json")))
    load_weights_into(model, path)
    return model.to(device).eval(), cfg
