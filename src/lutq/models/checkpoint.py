"""The lutq checkpoint directory (DESIGN.md "Artefacts and formats"):

    config.json          what it is: format + version, base HF config, quant layout, snapped, extra
    model.safetensors    all tensors (LUT-layer indices packed by lutq.quant.storage); tied aliases dropped
    tokenizer files      tokenizer.save_pretrained
    trainer_state/       optional: state.pt (tensors and counters, loaded with weights_only=True) + state.json

Written atomically as a whole directory; loading checks every piece and names what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lutq import __version__
from lutq.core.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, check_replaceable, sha256_file
from lutq.core.device import resolve_device
from lutq.core.errors import LutqError
from lutq.core.formats import read_versioned_json

FORMAT = "lutq-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state"


@dataclass
class CheckpointInfo:
    """The parsed config.json of a checkpoint."""

    path: Path
    architecture: str
    base_config: dict[str, Any]
    quant: dict[str, Any] | None = None
    snapped: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    weights_bytes: int | None = None
    lutq_version: str = ""


def _has_quant_layers(model: torch.nn.Module) -> bool:
    return any(getattr(m, "lutq_quantized", False) for m in model.modules())


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a lutq checkpoint (its config.json says format FORMAT)."""
    from lutq.models.load import lutq_format

    config = Path(path) / "config.json"
    try:
        return config.is_file() and lutq_format(config) == FORMAT
    except LutqError:  # an unreadable config.json
        return False


def check_checkpoint_out(out: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> None:
    """Where a checkpoint is written may be new, an empty directory or a lutq checkpoint (replaced whole on success,
    the input itself included: an in-place rewrite); never a file, a directory of anything else, or a directory
    holding one of the `inputs`. Commands call it before loading anything; `save_checkpoint` checks it again."""
    check_replaceable(
        out,
        what=f"a lutq checkpoint (no config.json of format {FORMAT})",
        is_ours=is_checkpoint,
        inputs=inputs,
        may_be_input=True,
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    extra: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (+ tokenizer, + optional trainer state) as a checkpoint directory, atomically. `path` may be
    new, empty or a lutq checkpoint (replaced whole); anything else there is refused, never deleted."""
    path = Path(path)
    check_checkpoint_out(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    quant = None
    snapped = False
    if _has_quant_layers(model):
        from lutq.quant import storage

        quant = storage.quant_layout(model)
        snapped = storage.is_snapped(model)
        state = storage.encode_state(model, state)
    tensors, aliases = dedupe_tied(state)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            save_trainer_state(tmp, trainer_state)
        arch = (config.get("architectures") or [type(model).__name__])[0]
        atomic_write_json(
            tmp / "config.json",
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "lutq_version": __version__,
                "architecture": arch,
                "snapped": snapped,
                "quant": quant,
                "aliases": aliases,
                "weights": {
                    "file": WEIGHTS,
                    "sha256": sha256_file(tmp / WEIGHTS),
                    "bytes": (tmp / WEIGHTS).stat().st_size,
                },
                "extra": extra or {},
                "base_config": config,
            },
        )
    return path


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); return the alias map."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out, aliases


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Parse and validate config.json; errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise LutqError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise LutqError(f"{path}: a checkpoint is a directory, got a file")
    cfg_path = path / "config.json"
    cfg = read_versioned_json(cfg_path, format=FORMAT, max_version=FORMAT_VERSION, what="lutq checkpoint")
    for key in ("architecture", "base_config"):
        if key not in cfg:
            raise LutqError(f"{cfg_path}: missing key {key!r}")
    for key in ("base_config", "quant", "weights", "aliases", "extra"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise LutqError(f"{cfg_path}: {key!r} must be a JSON object, got {type(cfg[key]).__name__}")
    weights = cfg.get("weights") or {}
    return CheckpointInfo(
        path=path,
        architecture=cfg["architecture"],
        base_config=cfg["base_config"],
        quant=cfg.get("quant"),
        snapped=bool(cfg.get("snapped")),
        aliases=cfg.get("aliases") or {},
        extra=cfg.get("extra") or {},
        weights_sha256=weights.get("sha256"),
        weights_bytes=weights.get("bytes"),
        lutq_version=cfg.get("lutq_version", ""),
    )


def _read_weights(info: CheckpointInfo, verify: bool) -> dict[str, torch.Tensor]:
    wpath = info.path / WEIGHTS
    if not wpath.is_file():
        raise LutqError(f"{wpath}: missing (incomplete checkpoint)")
    size = wpath.stat().st_size
    if info.weights_bytes is not None and size != info.weights_bytes:
        raise LutqError(f"{wpath}: {size} bytes, config.json says {info.weights_bytes} (truncated or replaced)")
    if verify and info.weights_sha256 and sha256_file(wpath) != info.weights_sha256:
        raise LutqError(f"{wpath}: sha256 mismatch with config.json (corrupt file)")
    try:
        return load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LutqError(f"{wpath}: corrupt or truncated safetensors file ({e})") from e


def build_base_model(info: CheckpointInfo, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Instantiate the (random-init) HF model described by the checkpoint's base_config."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = info.base_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise LutqError(f"{info.path}/config.json: unknown model_type {model_type!r}")
    config = CONFIG_MAPPING[model_type].from_dict(dict(info.base_config))
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    load_tokenizer: bool = True,
) -> tuple[torch.nn.Module, Any, CheckpointInfo]:
    """Load a checkpoint directory; returns (model in eval mode, tokenizer or None, info)."""
    info = read_checkpoint_info(path)
    tensors = _read_weights(info, verify)
    model = build_base_model(info)
    if info.quant:
        from lutq.quant import storage

        storage.apply_quant_layout(model, info.quant)
        tensors = storage.decode_state(model, tensors)
    for alias, target in info.aliases.items():
        if target not in tensors:
            raise LutqError(f"{info.path}/{WEIGHTS}: alias {alias} -> {target}, but {target} is missing")
        tensors[alias] = tensors[target]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LutqError(
            f"{info.path}/{WEIGHTS}: tensors do not match the model "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LutqError(
                f"{info.path}/{WEIGHTS}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}"
            )
        if v.dtype != expected[k].dtype and not (v.is_floating_point() and expected[k].is_floating_point()):
            raise LutqError(f"{info.path}/{WEIGHTS}: {k} has dtype {v.dtype}, model expects {expected[k].dtype}")
    model.load_state_dict(tensors, strict=True, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = None
    if load_tokenizer and any((info.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(info.path)
        except (OSError, ValueError) as e:
            raise LutqError(
                f"{info.path}: cannot load the checkpoint's tokenizer files ({str(e).splitlines()[0]})"
            ) from e
    return model.to(resolve_device(device)).eval(), tokenizer, info


def save_trainer_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write trainer state (optimizer/scheduler state dicts, RNG states, counters) into `path/trainer_state/`.

    Plain containers of tensors and numbers only (loaded back with torch.load(weights_only=True));
    JSON-able counters are mirrored into state.json for humans.
    """
    d = Path(path) / TRAINER_STATE
    d.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(d / "state.pt", buf.getvalue())
    summary = {k: v for k, v in state.items() if isinstance(v, int | float | str | bool)}
    atomic_write_json(d / "state.json", summary)
    return d


def load_trainer_state(path: str | os.PathLike[str], keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read `path/trainer_state/state.pt` safely (weights_only); clear error when missing, corrupt, or
    lacking one of `keys`."""
    f = Path(path) / TRAINER_STATE / "state.pt"
    if not f.is_file():
        raise LutqError(f"{f}: no trainer state (was this checkpoint saved by a training run?)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise LutqError(f"{f}: corrupt trainer state ({type(e).__name__}: {e})") from e
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise LutqError(f"{f}: incomplete trainer state (missing {', '.join(missing)})")
    return state


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], ckpt: str | os.PathLike[str], hint: str
) -> None:
    """`optimizer.load_state_dict(state["optimizer"])` of a trainer state from `ckpt`; a state whose parameter
    groups do not fit this run is a LutqError naming the checkpoint, with `hint` (what to change)."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise LutqError(f"{ckpt}: the saved optimizer state does not fit this run's parameters ({e}); {hint}") from e
