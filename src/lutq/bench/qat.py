"""`lutq bench qat`: the full KD-QAT training step on a random-weight model of a chosen shape.

One step = quantized student forward (`lutq.kd.student_hidden`) + KD loss against a synthetic teacher
top-K (`lutq.kd.kd_loss`) + backward + AdamW step, i.e. what `lutq train` does per micro-batch. The
batch (random input ids, random top-K ids with sorted logits) is built before the clock starts, so the
figures exclude data loading and eval. Variants: materialized vs factored LUT forward, gradient
checkpointing off/on, fp32 vs bf16 autocast (fp32 master weights), several sequence lengths, eager or
with the decoder layers compiled (as `lutq train --compile` does), and optionally the largest
batch that fits (binary search, GPU).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lutq.bench.maxbatch import MaxBatchResult, Probe, find_max_batch
from lutq.bench.timing import (
    StepStats,
    cleanup,
    device_name,
    mfu,
    peak_memory_mb,
    profile_steps,
    reset_peak_memory,
    time_steps,
    transformer_flops_per_token,
)
from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.models.runtime import compile_decoder_layers, set_grad_checkpointing

# Random-weight model shapes (built from a config, nothing downloaded).
SHAPES: dict[str, dict[str, Any]] = {
    # a small Qwen3-like model that steps in well under a second on 2 CPU cores
    "small": dict(
        arch="qwen3",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        vocab_size=8192,
    ),
    "tiny": dict(
        arch="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=320,
    ),
    "smollm2-135m": dict(
        arch="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
    ),
    "qwen3-0.6b": dict(
        arch="qwen3",
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
    ),
}
FORWARDS = ("materialized", "factored")
DTYPES = ("fp32", "bf16")


@dataclass
class QATBenchConfig(ConfigBase):
    """What `bench_qat` measures. "auto" picks the CPU or GPU default (shape small/qwen3-0.6b, fp32/bf16)."""

    shape: str = "auto"
    preset: str = "q2a4"
    mode: str = "all"
    seq_lens: tuple[int, ...] = (64, 128)
    batch: int = 0  # 0: 4 on CPU, 64 on GPU
    topk: int = 64
    dtypes: tuple[str, ...] = ("auto",)
    forwards: tuple[str, ...] = FORWARDS
    grad_ckpt: tuple[bool, ...] = (False, True)
    temperature: float = 2.0
    hard_top1_weight: float = 0.0
    full_kl_weight: float = 0.0
    compile: bool = False  # compile the decoder layers, as the trainer does (the first step of a new shape compiles)
    warmup: int = 1
    steps: int = 3
    lr: float = 5e-5
    device: str = "auto"
    profile: str = ""  # append a torch.profiler ops table of each configuration to this text file
    find_max_batch: bool = False
    max_batch_lo: int = 8
    max_batch_hi: int = 2048
    max_batch_multiple: int = 8
    seed: int = 0

    def resolved(self) -> QATBenchConfig:
        """A copy with every "auto" replaced by the concrete choice for the device."""
        import torch

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = torch.device(device).type == "cuda"
        cfg = self.replace(
            device=device,
            shape=self.shape if self.shape != "auto" else ("qwen3-0.6b" if gpu else "small"),
            batch=self.batch or (64 if gpu else 4),
            dtypes=tuple(("bf16" if gpu else "fp32") if d == "auto" else d for d in self.dtypes),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_shape(self.shape)
        bad = [x for x in self.forwards if x not in FORWARDS] + [x for x in self.dtypes if x not in DTYPES]
        if bad:
            raise LutqError(f"bench qat: unknown forward/dtype {bad}; forwards {FORWARDS}, dtypes {DTYPES}")
        if self.profile and self.find_max_batch:
            raise LutqError("bench qat: --profile times one batch per configuration; drop --find-max-batch")
        if min(self.seq_lens, default=0) < 2 or self.batch < 1 or self.steps < 1 or self.topk < 1:
            raise LutqError("bench qat: seq lens must be >= 2, batch, steps and topk >= 1")
        if self.warmup < 0:
            raise LutqError(f"bench qat: --warmup must be >= 0, got {self.warmup}")
        if self.find_max_batch and not 1 <= self.max_batch_lo <= self.max_batch_hi:
            raise LutqError(
                f"bench qat: --max-batch {self.max_batch_hi} is below the search's smallest batch "
                f"{self.max_batch_lo}; give --max-batch >= {max(1, self.max_batch_lo)}"
            )
        if self.find_max_batch and self.max_batch_multiple < 1:
            raise LutqError(f"bench qat: max_batch_multiple must be >= 1, got {self.max_batch_multiple}")


def check_shape(shape: str) -> None:
    """Raise LutqError unless `shape` names one of SHAPES."""
    if shape not in SHAPES:
        raise LutqError(f"bench: unknown shape {shape!r}; choose from {sorted(SHAPES)}")


def build_model(shape: str, device: str, seed: int = 0) -> Any:
    """A random-weight causal LM of `shape` (tied embeddings, fp32) built directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    check_shape(shape)
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    config = cls(
        **spec,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        architectures=[f"{'Qwen3' if arch == 'qwen3' else 'Llama'}ForCausalLM"],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def synthetic_batch(batch: int, seq_len: int, vocab: int, topk: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Random input ids and a random teacher top-K (distinct-ish ids, logits sorted descending) with a
    log-sum-exp that leaves the top-K ~60 % of the mass, on `device`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    topk_ids = torch.randint(0, vocab, (batch, seq_len - 1, topk), generator=g)
    logits = (torch.randn(batch, seq_len - 1, topk, generator=g) * 3).sort(dim=-1, descending=True).values
    lse = logits.logsumexp(-1) + 0.5
    return {
        "input_ids": ids.to(device),
        "topk_ids": topk_ids.to(device),
        "topk_logits": logits.to(device),
        "teacher_lse": lse.to(device),
    }


def _set_factored(model: Any, factored: bool) -> None:
    for m in model.modules():
        if getattr(m, "lutq_quantized", False):
            m.factored = factored


def model_flops_per_token(model: Any, seq_len: int, full_vocab: bool) -> float:
    """6·(quantized + other decoder matmul weights [+ lm_head when the loss needs full-vocab logits])
    + attention; gathered top-K logits are negligible and not counted."""
    c = model.config
    n = 0
    for name, m in model.named_modules():
        if name.endswith("lm_head") or "embed" in name:
            continue
        if getattr(m, "lutq_quantized", False) or type(m).__name__ == "Linear":
            n += m.in_features * m.out_features
    if full_vocab:
        n += c.vocab_size * c.hidden_size
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return transformer_flops_per_token(n, c.num_hidden_layers, c.num_attention_heads * head_dim, seq_len)


class QATStep:
    """Owns the quantized model + optimizer; `stats(batch, seq_len, ...)` measures one configuration."""

    def __init__(self, cfg: QATBenchConfig) -> None:
        import torch

        from lutq.kd import KDLossConfig, KDStudent
        from lutq.quant import quantize, set_trainable

        self.cfg, self.device = cfg, cfg.device
        self.model = build_model(cfg.shape, cfg.device, cfg.seed)
        quantize(self.model, cfg.preset)
        self.model.train()
        self.trainable = set_trainable(self.model, cfg.mode)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        loss_cfg = KDLossConfig(
            temperature=cfg.temperature, hard_top1_weight=cfg.hard_top1_weight, full_kl_weight=cfg.full_kl_weight
        )
        if cfg.compile:
            compile_decoder_layers(self.model)
        self.student = KDStudent(self.model, loss_cfg)
        self.device_name = device_name(cfg.device)

    def configure(self, factored: bool, grad_ckpt: bool) -> None:
        _set_factored(self.model, factored)
        set_grad_checkpointing(self.model, grad_ckpt)
        self.model.train()

    def step_fn(self, batch: dict[str, Any], dtype: str) -> Callable[[], Any]:
        import torch

        dev_type = torch.device(self.device).type

        def step() -> Any:
            self.opt.zero_grad(set_to_none=True)  # also drops grads a previous (OOM-ed) probe left behind
            amp = torch.autocast(dev_type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            with amp:
                loss, _ = self.student(batch)
            loss.backward()
            self.opt.step()
            return loss.detach()

        return step

    def stats(self, label: str, batch: int, seq_len: int, dtype: str, *, warmup: int, steps: int) -> StepStats:
        data = synthetic_batch(batch, seq_len, self.model.config.vocab_size, self.cfg.topk, self.device, self.cfg.seed)
        reset_peak_memory(self.device)
        step = self.step_fn(data, dtype)
        step_s, loss = time_steps(step, warmup=warmup, steps=steps, device=self.device)
        if self.cfg.profile:
            profile_steps(
                step, steps=steps, device=self.device, title=f"{label} batch {batch} L{seq_len}", path=self.cfg.profile
            )
        full_vocab = self.cfg.hard_top1_weight > 0 or self.cfg.full_kl_weight > 0
        flops = model_flops_per_token(self.model, seq_len, full_vocab) * batch * seq_len
        return StepStats(
            label=label,
            batch=batch,
            seq_len=seq_len,
            steps=steps,
            step_s=step_s,
            tokens_per_s=batch * seq_len / step_s,
            peak_mem_mb=peak_memory_mb(self.device),
            mfu=mfu(flops, step_s, self.device_name, dtype),
            loss=loss,
            extra={"flops_per_step": flops},
        )


@dataclass
class QATBenchResult:
    config: QATBenchConfig
    device: str
    rows: list[StepStats]
    max_batch: dict[str, MaxBatchResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "rows": [r.to_dict() for r in self.rows],
            "max_batch": {k: v.to_dict() for k, v in self.max_batch.items()},
        }


def bench_qat(cfg: QATBenchConfig, on_probe: Callable[[str, Probe], None] | None = None) -> QATBenchResult:
    """Measure every (dtype, forward, grad-ckpt, seq len) combination at `cfg.batch`, or with
    `find_max_batch` the largest batch that fits and the best-throughput batch of each combination."""
    cfg = cfg.resolved()
    runner = QATStep(cfg)
    rows: list[StepStats] = []
    maxb: dict[str, MaxBatchResult] = {}
    combos = itertools.product(cfg.dtypes, cfg.forwards, cfg.grad_ckpt, cfg.seq_lens)
    for dtype, forward, ckpt, seq_len in combos:
        label = f"{cfg.shape} {cfg.preset} {forward} {'ckpt' if ckpt else 'no-ckpt'} {dtype}" + (
            " compiled" if cfg.compile else ""
        )
        runner.configure(forward == "factored", ckpt)
        if not cfg.find_max_batch:
            rows.append(runner.stats(label, cfg.batch, seq_len, dtype, warmup=cfg.warmup, steps=cfg.steps))
            cleanup(cfg.device)
            continue

        def run(batch: int, label: str = label, seq_len: int = seq_len, dtype: str = dtype) -> StepStats:
            return runner.stats(label, batch, seq_len, dtype, warmup=1, steps=cfg.steps)

        res = find_max_batch(
            run,
            cfg.max_batch_lo,
            cfg.max_batch_hi,
            cfg.max_batch_multiple,
            on_probe=(lambda p, lab=f"{label} L{seq_len}": on_probe(lab, p)) if on_probe else None,
            cleanup_fn=lambda: cleanup(cfg.device),
        )
        maxb[f"{label} L{seq_len}"] = res
        rows.append(res.best)
    return QATBenchResult(cfg, runner.device_name, rows, maxb)
