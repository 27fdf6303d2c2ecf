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
from lutq.core.hub import hub_offline, hub_unreachable

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
    device = resolve_device(device)  # a bad device fails before a long load
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
        fmt = lutq_format(cfg)
        if fmt == "lutq-checkpoint":
            from lutq.models.checkpoint import load_checkpoint

            model, tok, _ = load_checkpoint(path, dtype=dtype, device=device)
            return model, tok
        if fmt is not None:
            raise LutqError(f"{path}: a {fmt} directory, not a model; {_OTHER_FORMATS.get(fmt, 'see docs/formats.md')}")
        return _load_hf(path, dtype, device)
    if spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~")):
        return _load_hf(spec_str, dtype, device, **_hub_source(spec_str))
    models = ", ".join(a for a, x in ASSETS.items() if x.kind == "model")
    raise LutqError(
        f"cannot resolve model {spec_str!r}: not an asset ({models}), not an existing path, not a hub id (org/name)"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# lutq directories with a config.json that are not models load_model reads, and what to do with them.
_OTHER_FORMATS = {
    "lutq-pretrain": "export it first: lutq pretrain export RUN --format hf OUT (baseline / gqa), then load OUT",
    "lutq-ane": "load it with lutq.export.load_ane_artefact",
}


def lutq_format(cfg: Path) -> str | None:
    """The `format` of a lutq directory's config.json ('lutq-checkpoint', 'lutq-pretrain', ...), None for HF."""
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise LutqError(f"{cfg}: unreadable config ({e})") from e
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) and fmt.startswith("lutq-") else None


def _hub_source(repo_id: str) -> dict[str, Any]:
    """How to load hub id `repo_id`: from the local Hugging Face cache when it holds the model (no network at all),
    else from the hub when it answers; else, within seconds, a LutqError naming the id and the ways out."""
    from huggingface_hub import constants, try_to_load_from_cache

    from lutq.assets.registry import ASSETS

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as e:  # huggingface_hub's HFValidationError: not a valid repo id
        raise LutqError(
            f"cannot resolve model {repo_id!r}: no such local path, and not a valid hub id ({str(e).splitlines()[0]})"
        ) from e
    if isinstance(cached, str):
        return {"local_files_only": True}
    models = ", ".join(a for a, x in ASSETS.items() if x.kind == "model")
    ways = (
        f"use an asset ({models}), a local HF directory, a .gguf file or a lutq checkpoint, or download the "
        "model into the Hugging Face cache where the hub is reachable"
    )
    where = f"no such local path, not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if hub_offline():
        raise LutqError(f"model {repo_id!r}: {where}, and HF_HUB_OFFLINE is set; {ways}")
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is not None:
        raise LutqError(
            f"model {repo_id!r}: {where}, and the hub {constants.ENDPOINT} is unreachable ({reason}); {ways}"
        )
    return {}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'bf16' / 'float32' / torch.dtype / None -> torch.dtype or None; LutqError for unknown names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in table:
        raise LutqError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _load_hf(
    where: str | Path,
    dtype: torch.dtype | None,
    device: str | torch.device,
    gguf_file: str | None = None,
    local_files_only: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Model + tokenizer through transformers: `where` is a local directory (a Path; with `gguf_file`, the file's
    directory) or a hub id (a str)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        kw["local_files_only"] = True
    # A GGUF file is parsed by transformers' GGUF reader, whose failures on a damaged file are not OSErrors.
    errors: tuple[type[BaseException], ...] = (Exception,) if gguf_file else (OSError, ValueError)
    what = Path(where) / gguf_file if gguf_file else where
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except errors as e:
        raise LutqError(f"cannot load a model config from {what}: {_first_line(e)}") from e
    architecture_of(config)
    # Without tokenizer files transformers builds an empty tokenizer from the model type, which encodes any text
    # to no tokens at all.
    local_dir = Path(where) if not gguf_file and isinstance(where, Path) else None
    if local_dir is not None and not any((local_dir / f).is_file() for f in TOKENIZER_FILES):
        raise LutqError(
            f"{local_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer into it (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw, **gguf_dense_kwargs(gguf_file))
    except errors as e:
        raise LutqError(f"cannot load model from {what}: {_first_line(e)}") from e
    if gguf_file:
        model = plain_copy(model)
    return model.to(resolve_device(device)).eval(), tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def gguf_dense_kwargs(gguf_file: str | None) -> dict[str, Any]:
    """Ask transformers for dense weights from a GGUF file where it can keep them packed (GgufConfig(dequantize))."""
    if not gguf_file:
        return {}
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model without transformers' GGUF quantizer: a GGUF-loaded model keeps it (even with dense
    weights), and then refuses save_pretrained and dtype casts. Rebuilt from its config without
    quantization_config, with the weights copied; in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg), dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    return plain.eval()
