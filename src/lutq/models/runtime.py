"""Runtime switches on HF causal LMs shared by the trainer and the benchmarks."""

from __future__ import annotations

from typing import Any


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
