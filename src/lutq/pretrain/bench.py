"""Pretraining throughput: tokens/s, step time, peak memory and MFU of the real training step
(`lutq.pretrain.train.train_step`) on random tokens. `lutq bench pretrain` calls `bench_pretrain`."""

from __future__ import annotations

import time
from typing import Any

import torch

from lutq.bench.timing import peak_memory_mb
from lutq.core.device import resolve_device
from lutq.core.errors import LutqError
from lutq.pretrain.config import PretrainConfig
from lutq.pretrain.flops import device_name, mfu, peak_flops
from lutq.pretrain.model import GPT, ModelConfig, count_params, flops_per_token
from lutq.pretrain.train import autocast_for, cast_for_precision, make_optimizer, resolve_precision, train_step


def bench_pretrain(
    size: str = "tiny",
    variant: str = "baseline",
    seq_len: int = 256,
    micro_batch: int = 4,
    steps: int = 10,
    device: str = "auto",
    dtype: str = "auto",
    *,
    warmup: int = 3,
    vocab_size: int = 50257,
    optimizer: str = "adamw",
    grad_checkpoint: bool = False,
    compile: bool = False,
    **model_overrides: Any,
) -> dict[str, Any]:
    """Time `steps` optimizer steps (after `warmup` untimed ones) of a `size`/`variant` model on random
    tokens. `dtype` is the training precision: auto, fp32, bf16-mixed or bf16. Returns a dict of figures
    (MFU is None on a CPU or an unknown GPU)."""
    if steps < 1 or warmup < 0:
        raise LutqError(f"bench needs steps >= 1 and warmup >= 0, got {steps} / {warmup}")
    if seq_len < 1 or micro_batch < 1:
        raise LutqError(f"bench pretrain needs --seq-len and --micro-batch >= 1, got {seq_len} / {micro_batch}")
    dev = resolve_device(device)
    precision = resolve_precision(dtype, dev)
    cfg = ModelConfig.preset(size, vocab_size=vocab_size, variant=variant, **model_overrides)
    cfg = cfg.replace(block_size=max(cfg.block_size, seq_len)).resolved()
    torch.manual_seed(0)
    model = cast_for_precision(GPT(cfg), precision)
    model.grad_checkpointing = grad_checkpoint
    model = model.to(dev).train()
    opt = make_optimizer(model, PretrainConfig(optimizer=optimizer, lr=1e-4).resolve(), dev)
    step_model = torch.compile(model) if compile else model
    autocast = autocast_for(precision, dev)
    gen = torch.Generator().manual_seed(0)

    def batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
        w = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=gen).to(dev)
        return [(w[:, :-1], w[:, 1:])]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        train_step(step_model, opt, batch(), autocast=autocast, grad_clip=1.0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    batches = [batch() for _ in range(steps)]
    sync()
    t0 = time.perf_counter()
    for b in batches:
        loss, _ = train_step(step_model, opt, b, autocast=autocast, grad_clip=1.0)
    loss_value = loss.item()
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * micro_batch * seq_len / elapsed
    n_params = count_params(model)
    fpt = flops_per_token(cfg, seq_len, n_params)
    peak = peak_flops(dev)
    peak_mem = peak_memory_mb(dev) * 2**20  # CUDA: max allocated; CPU: the process's peak RSS (KiB or bytes)
    return {
        "size": size,
        "variant": variant,
        "params": n_params,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "steps": steps,
        "precision": precision,
        "optimizer": optimizer,
        "grad_checkpoint": grad_checkpoint,
        "compile": compile,
        "device": str(dev),
        "device_name": device_name(dev),
        "tokens_per_s": tokens_per_s,
        "step_time_s": elapsed / steps,
        "peak_mem_bytes": int(peak_mem),
        "flops_per_token": fpt,
        "achieved_flops": tokens_per_s * fpt,
        "peak_flops": peak,
        "mfu": mfu(tokens_per_s, fpt, peak),
        "loss": loss_value,
    }
