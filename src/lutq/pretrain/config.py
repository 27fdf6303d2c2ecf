"""`PretrainConfig`, the VRAM presets, and the plan a run prints before it starts.

Fields left as None are filled by `resolve()`, in this order: explicit value > `--gpu-mem` preset >
built-in default. The resolved config is what `run.json` records and what a resume must match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.pretrain.model import SIZES, ModelConfig, flops_per_token, params_of
from lutq.pretrain.schedule import (
    Schedule,
    format_count,
    max_seq_len,
    parse_count,
    parse_seq_schedule,
    planned_tokens,
    segments,
    seq_len_for_step,
    steps_for_tokens,
)

# `--gpu-mem GB` presets for a 1B model on one GPU (the seed launcher's table; 80 GB takes the same 16,384
# tokens per step as 8 x 2048 in one micro-batch instead of 1 x 8: the `1b` gqa step at micro-batch 8, seq 2048,
# bf16-mixed AdamW peaked at 63.3 GiB eager and 46.6 GiB compiled on an H200, docs/benchmarks.md "GPU").
# A preset fills only the fields not given explicitly.
GPU_MEM_PRESETS: dict[int, dict[str, Any]] = {
    80: {"seq_len": 2048, "seq_schedule": "", "micro_batch": 8, "grad_accum": 1, "grad_checkpoint": False},
    40: {
        "seq_len": 1024,
        "seq_schedule": "512@0,1024@2000,2048@12000",
        "micro_batch": 1,
        "grad_accum": 16,
        "grad_checkpoint": True,
    },
    24: {
        "seq_len": 512,
        "seq_schedule": "512@0,1024@12000",
        "micro_batch": 1,
        "grad_accum": 32,
        "grad_checkpoint": True,
        "precision": "bf16",
        "optimizer": "lion",
    },
    16: {
        "seq_len": 256,
        "seq_schedule": "256@0,512@12000",
        "micro_batch": 1,
        "grad_accum": 64,
        "grad_checkpoint": True,
        "precision": "bf16",
        "optimizer": "lion",
    },
}
DEFAULTS: dict[str, Any] = {
    "seq_len": 1024,
    "seq_schedule": "",
    "micro_batch": 4,
    "grad_accum": 4,
    "grad_checkpoint": False,
    "precision": "auto",
    "optimizer": "adamw",
}
DEFAULT_LR = {"adamw": 3e-4, "lion": 1e-4}
OPTIMIZERS = ("adamw", "lion")
PRECISIONS = ("auto", "fast", "fp32", "bf16-mixed", "bf16")
# Options that only steer this invocation; a resume may change them.
RUNTIME_FIELDS = ("stop_after", "time_limit", "device", "compile", "log_every")


@dataclass
class PretrainConfig(ConfigBase):
    """Everything `lutq pretrain` needs. See docs/pretrain.md for the flags."""

    data: str = ""
    out: str = ""  # run directory; default runs/pretrain-{size}-{variant}-seed{seed}
    # model
    size: str = "tiny"
    variant: str = "baseline"
    kv_heads: int | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    block_size: int | None = None
    attn_dim: int | None = None
    sem_dim: int | None = None
    geo_dim: int | None = None
    null_attn: bool = False
    tie_qk: bool = False
    learned_temp: bool = True
    norm: str = "rmsnorm"
    # batch, length and budget
    gpu_mem: int | None = None
    seq_len: int | None = None
    seq_schedule: str | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    steps: int = 1000
    target_tokens: str | None = None
    # optimization
    optimizer: str | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str | None = None
    grad_checkpoint: bool | None = None
    compile: bool | None = None  # None: on with CUDA (52 % vs 30 % MFU for `1b` on an H200), off elsewhere
    # evaluation, logging, checkpoints
    val_fraction: float = 0.05
    eval_every: int = 200
    eval_iters: int = 20
    log_every: int = 10
    save_every: int = 500
    sample_tokens: int = 64
    seed: int = 1337
    device: str = "auto"
    stop_after: int | None = None  # stop (saving last/) after this many steps in this invocation
    time_limit: float | None = None  # ... or after this many minutes of training

    def resolve(self) -> PretrainConfig:
        """Fill None fields (explicit > gpu_mem preset > default) and check the values."""
        if self.gpu_mem is not None and self.gpu_mem not in GPU_MEM_PRESETS:
            raise LutqError(f"--gpu-mem {self.gpu_mem}: choose one of {', '.join(map(str, GPU_MEM_PRESETS))}")
        preset = GPU_MEM_PRESETS.get(self.gpu_mem or 0, {})
        fill = {k: preset.get(k, v) for k, v in DEFAULTS.items() if getattr(self, k) is None}
        c = self.replace(**fill)
        if c.optimizer not in OPTIMIZERS:
            raise LutqError(f"unknown optimizer {c.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if c.precision not in PRECISIONS:
            raise LutqError(f"unknown precision {c.precision!r}; choose from {', '.join(PRECISIONS)}")
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer]
        if not c.out:
            c.out = f"runs/pretrain-{c.size}-{c.variant}-seed{c.seed}"
        for name in ("seq_len", "micro_batch", "grad_accum", "steps", "eval_iters", "log_every"):
            if getattr(c, name) <= 0:
                raise LutqError(f"{name} must be positive, got {getattr(c, name)}")
        for name in ("eval_every", "save_every", "sample_tokens", "warmup"):
            if getattr(c, name) < 0:
                raise LutqError(f"{name} must be >= 0 (0: never / none), got {getattr(c, name)}")
        if c.stop_after is not None and c.stop_after < 1:
            raise LutqError(f"stop_after must be at least 1 step, got {c.stop_after}")
        if c.time_limit is not None and not c.time_limit > 0:
            raise LutqError(f"time_limit must be a positive number of minutes, got {c.time_limit}")
        if not 0 < c.val_fraction < 1:
            raise LutqError(f"val_fraction must be in (0, 1), got {c.val_fraction}")
        parse_seq_schedule(c.seq_schedule)
        return c

    def model_config(self, vocab_size: int, steps: int | None = None) -> ModelConfig:
        """The decoder config: size preset + explicit dims; block_size grows to the longest sequence used in
        `steps` steps (default: the configured steps)."""
        if self.size not in SIZES:
            raise LutqError(f"unknown model size {self.size!r}; choose from {', '.join(SIZES)}")
        dims = {
            k: getattr(self, k)
            for k in ("d_model", "n_layers", "n_heads", "d_ff", "kv_heads", "attn_dim", "sem_dim", "geo_dim")
        }
        longest = max_seq_len(parse_seq_schedule(self.seq_schedule), self.seq_len, steps or self.steps)
        block = self.block_size
        if block is not None and longest > block:
            raise LutqError(
                f"the longest sequence length {longest} (seq_len / seq_schedule) exceeds block_size {block}"
            )
        block = block or max(SIZES[self.size]["block_size"], longest)
        return (
            ModelConfig.preset(self.size, **dims)
            .replace(
                vocab_size=vocab_size,
                block_size=block,
                variant=self.variant,
                null_attn=self.null_attn,
                tie_qk=self.tie_qk,
                learned_temp=self.learned_temp,
                norm=self.norm,
            )
            .resolved()
        )


def unused_seq_len_note(seq_len: int | None, seq_schedule: str | None) -> str | None:
    """A note when an explicitly given `seq_len` never applies because the schedule sets the length from step 0
    (the seed's 80 GB recipe passed --train-seq-len 2048 with the default "1024@0,..." schedule and so trained at
    1024); None otherwise. `seq_len` is the value before `resolve()` (None: not given)."""
    schedule = parse_seq_schedule(seq_schedule)
    if seq_len is None or not schedule or schedule[0][1] > 0 or schedule[0][0] == seq_len:
        return None
    return (
        f"--seq-len {seq_len} is not used: the seq schedule {seq_schedule!r} sets the length from step 0 "
        f"(training starts at {schedule[0][0]}); --seq-len applies only before the schedule's first entry"
    )


def heldout_overlap_note(plan: Plan, meta: dict[str, Any]) -> str | None:
    """A note when the token file's held-out documents (its last `heldout_tail_tokens` tokens, the `SRC:val`
    split) reach into the part the run trains on: `lutq eval ppl --text SRC:val` would then score text the
    model was trained on. None when they all lie in the held-out tail (or the meta does not say)."""
    heldout = meta.get("heldout_tail_tokens")
    if not isinstance(heldout, int) or isinstance(heldout, bool) or heldout <= plan.val_tokens:
        return None
    fraction = math.ceil(heldout / (plan.train_tokens + plan.val_tokens) * 1e4) / 1e4
    return (
        f"the token file's held-out documents are its last {heldout:,} tokens, but only {plan.val_tokens:,} are "
        f"held out (val_fraction): {heldout - plan.val_tokens:,} tokens of them are trained on, so perplexity on "
        f"the sources' :val split is no longer held-out; use --val-fraction {fraction:g} or more"
    )


@dataclass
class Plan:
    """What a run will do, printed before anything runs."""

    model: ModelConfig
    params: int
    world_size: int
    global_batch: int  # sequences per optimizer step
    steps: int
    schedule: Schedule
    seq_len: int
    planned_tokens: int
    target_tokens: int | None
    train_tokens: int
    val_tokens: int
    eval_seq_len: int
    flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float:
        return self.planned_tokens / max(1, self.train_tokens)

    def seq_len_at(self, step: int) -> int:
        return seq_len_for_step(step, self.schedule, self.seq_len)

    def rows(self) -> list[tuple[str, str]]:
        m = self.model
        dims = f"d {m.d_model} / {m.n_layers} layers / {m.n_heads} heads / d_ff {m.d_ff} / block {m.block_size}"
        attn = (
            m.variant
            + (f" (kv_heads {m.kv_heads})" if m.variant == "gqa" else "")
            + (f" (attn_dim {m.attn_dim})" if m.variant in ("bottleneck", "decoupled") else "")
            + (f" (sem {m.sem_dim}, geo {m.geo_dim})" if m.variant == "decoupled" else "")
            + "".join(f", {o}" for o in ("null_attn", "tie_qk") if getattr(m, o))
        )
        seqs = ", ".join(f"{s}@{st}" for s, st in self.schedule) or f"{self.seq_len} (constant)"
        target = f" (target {format_count(self.target_tokens)})" if self.target_tokens else ""
        return [
            ("model", f"{dims}, vocab {m.vocab_size:,}"),
            ("attention", attn),
            ("parameters", f"{self.params:,} ({format_count(self.params)})"),
            ("global batch", f"{self.global_batch} sequences (micro x accum x world {self.world_size})"),
            ("seq length", seqs),
            ("steps", f"{self.steps:,}"),
            ("planned tokens", f"{format_count(self.planned_tokens)}{target}"),
            ("data", f"{format_count(self.train_tokens)} train + {format_count(self.val_tokens)} held-out tokens"),
            ("epochs over the data", f"{self.epochs:.2f}"),
            ("estimated compute", f"{self.flops:.3g} FLOPs"),
        ]


def make_plan(cfg: PretrainConfig, n_tokens: int, vocab_size: int, world_size: int = 1) -> Plan:
    """Resolve the budget: steps (or steps solved from target_tokens), tokens, epochs, FLOPs."""
    schedule = parse_seq_schedule(cfg.seq_schedule)
    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    notes: list[str] = []
    steps, target = cfg.steps, None
    if cfg.target_tokens:
        target = parse_count(cfg.target_tokens, "target tokens")
        steps = steps_for_tokens(target, global_batch, schedule, cfg.seq_len)
        notes.append(f"--target-tokens {cfg.target_tokens}: {steps:,} steps (overrides --steps)")
    model = cfg.model_config(vocab_size, steps)
    eval_seq = max_seq_len(schedule, cfg.seq_len, steps)
    val_tokens = int(n_tokens * cfg.val_fraction)
    train_tokens = n_tokens - val_tokens
    if val_tokens < eval_seq + 1:
        raise LutqError(
            f"held-out tail of {val_tokens} tokens (val_fraction {cfg.val_fraction}) is shorter than "
            f"one evaluation window of {eval_seq + 1} tokens; use more data or a larger val_fraction"
        )
    if train_tokens < eval_seq + 1:
        raise LutqError(f"{train_tokens} training tokens are fewer than one window of {eval_seq + 1}")
    params = params_of(model)
    tokens = planned_tokens(steps, global_batch, schedule, cfg.seq_len)
    flops = sum(
        (end - start) * global_batch * seq * flops_per_token(model, seq, params)
        for start, end, seq in segments(steps, schedule, cfg.seq_len)
    )
    plan = Plan(
        model=model,
        params=params,
        world_size=world_size,
        global_batch=global_batch,
        steps=steps,
        schedule=schedule,
        seq_len=cfg.seq_len,
        planned_tokens=tokens,
        target_tokens=target,
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        eval_seq_len=eval_seq,
        flops=flops,
        notes=notes,
    )
    if cfg.warmup >= steps:
        notes.append(
            f"--warmup {cfg.warmup} is not shorter than the run ({steps:,} steps): warmup is cut to "
            f"{max(0, steps - 1)} steps and the lr never decays (the last step runs at the peak lr)"
        )
    if plan.epochs > 1:
        notes.append(
            f"the plan reads the training tokens {plan.epochs:.1f} times (epochs > 1): expect repetition "
            "to limit the gains; prepare more data for this budget"
        )
    return plan
