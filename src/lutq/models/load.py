"""One loader for every way a user names a model: `--model` takes an asset name, a lutq checkpoint
directory, a local HF directory, a .gguf file, or a hub id (used only when the hub or a local HF cache
can provide it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lutq.core.device import resolve_device
from lutq.core.errors import LutqError

# HF architecture class -> short name used across lutq (layer patterns, tiny test configs).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
}


def architecture_of(model_or_config: Any) -> str:
    """Short architecture name ('qwen3', 'llama', 'gemma3') of a model or config; error if unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    archs = list(getattr(config, "architectures", None) or [])
    if not archs and hasattr(model_or_config, "config"):
        archs = [type(model_or_config).__name__]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    model_type = getattr(config, "model_type", None)
    by_type = {"qwen3": "qwen3", "llama": "llama", "gemma3_text": "gemma3"}
    if model_type in by_type:
        return by_type[model_type]
    raise LutqError(
        f"unsupported architecture {archs or model_type!r}; lutq supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    fetch: bool = True,
) -> tuple[torch.nn.Module, Any]:
    """Return (model in eval mode, tokenizer) for `spec`.

    Resolution order: asset name (fetched on demand when `fetch`), existing path (lutq checkpoint,
    HF directory, .gguf file), then hub id.
    """
    from lutq.assets.registry import ASSETS

    dtype = parse_dtype(dtype)
    spec_str = str(spec)
    if spec_str in ASSETS:
        from lutq.assets.fetch import asset_path, is_fetched
        from lutq.assets.fetch import fetch as fetch_asset

        if ASSETS[spec_str].kind != "model":
            raise LutqError(f"asset {spec_str!r} is a {ASSETS[spec_str].kind} corpus, not a model")
        path = fetch_asset(spec_str) if fetch and not is_fetched(spec_str) else asset_path(spec_str)
        return _load_hf(path, dtype, device)
    path = Path(spec_str).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise LutqError(f"{path}: a model file must be .gguf; for HF or lutq models pass the directory")
            return _load_hf(path.parent, dtype, device, gguf_file=path.name)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise LutqError(f"{path}: not a model directory (no config.json)")
        if _is_lutq_checkpoint(cfg):
            from lutq.models.checkpoint import load_checkpoint

            model, tok, _ = load_checkpoint(path, dtype=dtype, device=device)
            return model, tok
        return _load_hf(path, dtype, device)
    if spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~")):
        return _load_hf(spec_str, dtype, device)
    models = ", ".join(a for a, x in ASSETS.items() if x.kind == "model")
    raise LutqError(
        f"cannot resolve model {spec_str!r}: not an asset ({models}), not an existing path, not a hub id (org/name)"
    )


def _is_lutq_checkpoint(cfg: Path) -> bool:
    try:
        return json.loads(cfg.read_text()).get("format") == "lutq-checkpoint"
    except (json.JSONDecodeError, OSError) as e:
        raise LutqError(f"{cfg}: unreadable config ({e})") from e


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'bf16' / 'float32' / torch.dtype / None -> torch.dtype or None; LutqError for unknown names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise LutqError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _load_hf(
    where: str | Path, dtype: torch.dtype | None, device: str | torch.device, gguf_file: str | None = None
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:
        raise LutqError(f"cannot load a model config from {where}: {str(e).splitlines()[0]}") from e
    architecture_of(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise LutqError(f"cannot load model from {where}: {str(e).splitlines()[0]}") from e
    return model.to(resolve_device(device)).eval(), tokenizer
