"""Runtime switches on HF causal LMs shared by the trainer and the benchmarks."""

from __future__ import annotations

from typing import Any

from lutq.core.errors import LutqError


def set_grad_checkpointing(model: Any, on: bool) -> None:
    """Turn HF activation (gradient) checkpointing of every decoder layer on (non-reentrant) or off,
    across transformers versions (5.x renamed it `activation_checkpointing_*`)."""
    if on:
        model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def decoder_body(model: Any) -> Any:
    """The causal LM's decoder stack without the output head (`model.model` for Qwen3, Llama, Gemma 3; else
    `get_decoder()`, else the model itself)."""
    from torch import nn

    body = getattr(model, "model", None)
    if isinstance(body, nn.Module):
        return body
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


def decoder_layers(model: Any) -> Any:
    """The decoder blocks (an nn.ModuleList) of a Qwen3 / Llama / Gemma 3 causal LM."""
    from torch import nn

    layers = getattr(decoder_body(model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LutqError(f"{type(model).__name__} has no decoder layers at model.layers")
    return layers


def compile_unavailable(device: Any) -> str | None:
    """Why `torch.compile` cannot run on `device` here (e.g. no C++ compiler for inductor's CPU kernels), or None
    when it can: compiles and runs a one-op function once (cached by inductor after the first time)."""
    import torch

    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        fn(torch.ones(4, device=device))
    except Exception as e:  # any backend failure means: train eager
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return None


def compile_decoder_layers(model: Any) -> int:
    """`torch.compile` each decoder layer in place (regional compilation); returns how many.

    The layers share their code, so inductor compiles one and reuses it for the rest: compile time stays that
    of one layer whatever the depth, where compiling the whole student grows with it (SmolLM2-135M q2a4 + KD loss
    did not finish within 150 s on an H200; on CPU, 41 s for 4 layers, 76 s for 12, against ~23 s for one layer
    cold). `Module.compile()` keeps the parameter names, so checkpoints are unchanged.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def native_bf16(device: Any) -> bool:
    """Whether `device` multiplies bf16 matrices natively (faster than fp32): CUDA GPUs with bf16 support,
    CPUs with AVX512-BF16 or AMX tiles. Elsewhere (AVX2 CPUs, MPS) bf16 autocast is emulated and slower."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu's private probes are the only ISA check torch offers; absent in a future version = no.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


AUTO_PRECISIONS = ("auto", "fast")


def auto_picks_bf16(choice: str, device: Any) -> bool:
    """The one rule behind the automatic precision choices of `lutq train` and `lutq pretrain`: 'auto' is bf16
    (autocast, fp32 master weights) on CUDA and fp32 elsewhere; 'fast' is bf16 wherever `native_bf16(device)`."""
    import torch

    if choice == "auto":
        return torch.device(device).type == "cuda"
    if choice == "fast":
        return native_bf16(device)
    raise ValueError(f"not an automatic precision choice: {choice!r} (one of {AUTO_PRECISIONS})")
