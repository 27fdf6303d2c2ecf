"""`lutq pretrain [--run]` and `lutq pretrain export RUN OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lutq.core.console import console
from lutq.core.device import DEVICE_HELP
from lutq.core.errors import LutqError

pretrain_app = typer.Typer(
    help="Pretrain a GPT-style decoder from a token file (prints the plan; trains only with --run), "
    "or export a run (`lutq pretrain export RUN OUT`).",
)

_O = typer.Option


@pretrain_app.callback(invoke_without_command=True)
def pretrain_command(
    ctx: typer.Context,
    data: Path = _O(None, "--data", help="Token file from `lutq data prepare` (its .meta.json is checked)."),
    out: Path = _O(None, "--out", "-o", help="Run directory (default runs/pretrain-SIZE-VARIANT-seedSEED)."),
    config: Path = _O(None, "--config", help="TOML/JSON file with PretrainConfig keys; flags override it."),
    run: bool = _O(False, "--run", help="Train. Without it this is a dry run that prints the plan."),
    resume: Path = _O(None, "--resume", help="Continue the run in this directory exactly (its run.json config)."),
    size: str = _O(None, "--size", help="Model size preset: tiny (default), small, medium, 1b."),
    variant: str = _O(None, "--variant", help="Attention: baseline (default), gqa, bottleneck, decoupled."),
    kv_heads: int = _O(None, "--kv-heads", help="gqa: key/value heads (default n_heads / 4)."),
    d_model: int = _O(None, "--d-model", help="Override the preset's width."),
    n_layers: int = _O(None, "--layers", help="Override the preset's depth."),
    n_heads: int = _O(None, "--heads", help="Override the preset's head count."),
    d_ff: int = _O(None, "--d-ff", help="Override the preset's SwiGLU width."),
    block_size: int = _O(None, "--block", help="Maximum sequence length (default: preset, grown to the schedule)."),
    attn_dim: int = _O(None, "--attn-dim", help="Total Q/V width (bottleneck/decoupled default sem + geo)."),
    sem_dim: int = _O(None, "--sem-dim", help="decoupled: semantic Q/K width (default d_model / 16)."),
    geo_dim: int = _O(None, "--geo-dim", help="decoupled: geometric (RoPE) Q/K width (default d_model / 8)."),
    null_attn: bool = _O(None, "--null-attn/--no-null-attn", help="Learned null key/value slot (default: off)."),
    tie_qk: bool = _O(None, "--tie-qk/--no-tie-qk", help="Keys use the query projection (not with gqa; default: off)."),
    learned_temp: bool = _O(
        None, "--learned-temp/--no-learned-temp", help="Learned per-head temperature (default: on)."
    ),
    norm: str = _O(None, "--norm", help="rmsnorm (default) or layernorm."),
    gpu_mem: int = _O(None, "--gpu-mem", help="VRAM preset 80|40|24|16: seq len, micro-batch, accumulation."),
    seq_len: int = _O(
        None,
        "--seq-len",
        "-L",
        help="Training sequence length in tokens (before/without a schedule; default 1024, or --gpu-mem's).",
    ),
    seq_schedule: str = _O(None, "--seq-schedule", help='Sequence-length schedule, e.g. "512@0,1024@2000".'),
    micro_batch: int = _O(None, "--micro-batch", help="Sequences per forward pass (default 4, or --gpu-mem's)."),
    grad_accum: int = _O(None, "--grad-accum", help="Micro-batches per optimizer step (default 4, or --gpu-mem's)."),
    steps: int = _O(None, "--steps", help="Optimizer steps (default 1000)."),
    target_tokens: str = _O(None, "--target-tokens", help="Solve the step count for this many tokens (10B)."),
    optimizer: str = _O(None, "--optimizer", help="adamw (default) or lion."),
    lr: float = _O(None, "--lr", help="Peak learning rate (default adamw 3e-4, lion 1e-4)."),
    min_lr_ratio: float = _O(None, "--min-lr-ratio", help="Cosine floor as a fraction of --lr (0.1)."),
    warmup: int = _O(None, "--warmup", help="Linear warmup steps (100)."),
    weight_decay: float = _O(None, "--weight-decay", help="Decoupled weight decay on matrices (0.1)."),
    grad_clip: float = _O(None, "--grad-clip", help="Gradient norm clip (1.0; 0 disables)."),
    precision: str = _O(
        None,
        "--precision",
        help="auto, fast (bf16-mixed where bf16 is native), fp32, "
        "bf16-mixed (fp32 master + autocast), bf16 (default auto, or --gpu-mem's).",
    ),
    grad_checkpoint: bool = _O(
        None,
        "--grad-checkpointing/--no-grad-checkpointing",
        help="Recompute activations in backward (less memory; default off, or --gpu-mem's).",
    ),
    grad_checkpoint_old: bool = _O(
        None,
        "--grad-checkpoint/--no-grad-checkpoint",
        hidden=True,
        help="Old spelling of --grad-checkpointing/--no-grad-checkpointing.",
    ),
    compile: bool = _O(None, "--compile/--no-compile", help="torch.compile the model (default: on with CUDA)."),
    val_fraction: float = _O(None, "--val-fraction", help="Held-out tail of the token file (0.05)."),
    eval_every: int = _O(None, "--eval-every", help="Evaluate (and update best/) every N steps (200)."),
    eval_iters: int = _O(None, "--eval-batches", help="Micro-batches per evaluation (20)."),
    eval_iters_old: int = _O(None, "--eval-iters", hidden=True, help="Old spelling of --eval-batches."),
    log_every: int = _O(None, "--log-every", help="Log every N steps (10)."),
    save_every: int = _O(None, "--save-every", help="Write last/ every N steps (500; also at the end)."),
    sample_tokens: int = _O(None, "--sample-tokens", help="Tokens of the sample in summary.md (64; 0: none)."),
    seed: int = _O(None, "--seed", help="Seed of the init and of the data positions (1337)."),
    device: str = _O(None, "--device", help=DEVICE_HELP + " Default: auto."),
    stop_after: int = _O(None, "--stop-after", help="Stop after N steps in this invocation (resumable)."),
    time_limit: float = _O(None, "--time-limit", help="Stop after this many minutes (resumable)."),
) -> None:
    """Pretrain: print the plan (params, global batch, steps, tokens, epochs, FLOPs); train with --run."""
    if grad_checkpoint is None:
        grad_checkpoint = grad_checkpoint_old
    if eval_iters is None:
        eval_iters = eval_iters_old
    flags: dict[str, Any] = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in locals().items()
        if k not in ("ctx", "config", "run", "resume", "grad_checkpoint_old", "eval_iters_old") and v is not None
    }
    if ctx.invoked_subcommand is not None:
        return
    from lutq.pretrain.config import RUNTIME_FIELDS, PretrainConfig
    from lutq.pretrain.train import load_run_config, pretrain

    if resume:
        # --data may point at the token file's new place (its identity is checked against run.json)
        changeable = (*RUNTIME_FIELDS, "data")
        fixed = sorted(k for k in flags if k not in changeable)
        if fixed:  # refused, not ignored: a run that silently kept its old --steps or --lr is worse than an error
            raise LutqError(
                f"--resume {resume} continues the run exactly as run.json says; cannot change "
                f"{', '.join('--' + k.replace('_', '-') for k in fixed)} (a resume may change "
                f"{', '.join('--' + k.replace('_', '-') for k in changeable)}); start a new run for other settings"
            )
        cfg = load_run_config(resume).replace(**{k: v for k, v in flags.items() if k in changeable})
        pretrain(cfg, run=run, resume=True)
        return
    base = PretrainConfig.from_file(config) if config else PretrainConfig()
    pretrain(base.replace(**flags), run=run)


@pretrain_app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="Run directory (uses best/, else last/) or a checkpoint directory."),
    out: Path = typer.Argument(..., help="Output directory."),
    format: str = _O("hf", "--format", "-f", help="hf: a transformers LlamaForCausalLM directory."),
    checkpoint: str = _O("best", "--checkpoint", help="best or last (for a run directory)."),
    tokenizer: str = _O(
        None,
        "--tokenizer",
        "-t",
        help="Tokenizer to ship when the checkpoint has none (gpt2, a model asset or an HF tokenizer directory).",
    ),
    dtype: str = _O("fp32", "--dtype", help="fp32, bf16 or fp16 weights."),
) -> None:
    """Export a pretrained baseline/gqa model as a transformers directory (usable as a KD teacher)."""
    import torch

    from lutq.pretrain.export import FORMATS, export_hf

    if format not in FORMATS:
        raise LutqError(f"--format {format!r}: choose from {', '.join(FORMATS)}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise LutqError(f"--dtype {dtype!r}: choose from {', '.join(dtypes)}")
    path = export_hf(run, out, checkpoint=checkpoint, tokenizer=tokenizer, dtype=dtypes[dtype])
    console.print(f"load it with lutq.models.load_model({str(path)!r}) or transformers' AutoModelForCausalLM")


def register(app: typer.Typer) -> None:
    app.add_typer(pretrain_app, name="pretrain")
