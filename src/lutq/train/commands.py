"""`lutq train` (KD-QAT against a cache, resumable) and `lutq plot` (loss curves of runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from lutq.core.console import console
from lutq.core.device import DEVICE_HELP
from lutq.core.errors import LutqError


def train_command(
    cache: Path = typer.Option(None, "--cache", "-c", help="KD cache directory (from `lutq cache`)."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory to create (run.json, logs, best/, last/)."),
    model: str = typer.Option(None, "--model", "-m", help="FP model to quantize (default: the cache's teacher)."),
    preset: str = typer.Option(
        None, "--preset", "-p", help="Quantization preset for --model: q2a4 (default), q4a4, q4a4_r32, q2a2."
    ),
    init: Path = typer.Option(None, "--init", help="Start from this quantized lutq checkpoint instead."),
    resume: Path = typer.Option(None, "--resume", help="Continue this run directory exactly from its last/."),
    config: Path = typer.Option(None, "--config", help="TrainConfig as .toml/.json (flags override it)."),
    mode: str = typer.Option(
        None, "--mode", help="What trains: all (default), mlp-only, attn-only, g-only, freeze-g, lut."
    ),
    init_lut: str = typer.Option(None, "--init-lut", help="--model init: uniform or kmeans LUTs (kmeans)."),
    init_tighten: int = typer.Option(None, "--init-tighten", help="--model init: scale tighten rounds (4)."),
    init_calib_sequences: int = typer.Option(
        None, "--init-calib-sequences", help="--model init: GPTQ on this many cache sequences, 0 = off (256)."
    ),
    train_lut: bool = typer.Option(
        None, "--train-lut/--no-train-lut", help="Also train the LUT entries (default: off)."
    ),
    latent: bool = typer.Option(
        None,
        "--latent/--no-latent",
        help="Train the weights (straight-through), "
        "starting from W_eff; scales and LUT stay fixed. Latent weights are in scale units "
        "(W / S), so the default --lr is 2e-3 (docs/train.md). Default: off.",
    ),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default 1000)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Sequences per micro-batch, over all ranks (8)."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (1)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (1e-4; 2e-3 with --latent)."),
    warmup: int = typer.Option(None, "--warmup", help="Linear warmup steps (100)."),
    min_lr_ratio: float = typer.Option(None, "--min-lr-ratio", help="Cosine floor as a fraction of --lr (0.1)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (0)."),
    clip: float = typer.Option(None, "--grad-clip", help="Gradient norm clip, 0 = off (1.0)."),
    clip_old: float = typer.Option(None, "--clip", hidden=True, help="Old spelling of --grad-clip."),
    temperature: float = typer.Option(None, "--temperature", help="KD softmax temperature (KDLossConfig: 2.0)."),
    kd_weight: float = typer.Option(None, "--kd-weight", help="Weight of T²·KL over the teacher's top-K (1)."),
    hard_top1_weight: float = typer.Option(
        None, "--hard-top1-weight", help="Weight of full-vocab CE on the teacher's top-1 (0.2)."
    ),
    label_ce_weight: float = typer.Option(
        None, "--label-ce-weight", help="Weight of full-vocab CE on the text's own next token (0)."
    ),
    full_kl_weight: float = typer.Option(
        None,
        "--full-kl-weight",
        help="Weight of the KL at T=1 over the full vocabulary, ids outside the "
        "teacher's top-K as one bucket (0; needs a cache with teacher_lse).",
    ),
    log_every: int = typer.Option(None, "--log-every", help="Log train metrics every N steps (10)."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate on the val split every N steps (100)."),
    eval_batches: int = typer.Option(None, "--eval-batches", help="Validation batches per eval, 0 = no eval (20)."),
    save_every: int = typer.Option(None, "--save-every", help="Save last/ with trainer state every N steps (100)."),
    ppl_text: list[str] = typer.Option(
        None, "--ppl-text", help="Held-out corpus for perplexity at eval, e.g. shakespeare:val (repeatable)."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for data order and RNG (0)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP + " Default: auto."),
    precision: str = typer.Option(
        None,
        "--precision",
        help="auto (bf16 autocast on CUDA, fp32 on CPU), fast "
        "(bf16 autocast where the device has native bf16: CUDA, AVX512-BF16/AMX CPUs), "
        "fp32, bf16. Default: auto.",
    ),
    grad_checkpointing: bool = typer.Option(
        None,
        "--grad-checkpointing/--no-grad-checkpointing",
        help="Recompute activations in backward (less memory; default: off).",
    ),
    compile: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile each decoder layer (one compile, reused by every layer; default: off).",
    ),
    logger: list[str] = typer.Option(
        None, "--logger", help="wandb, trackio or tensorboard (repeatable; default: none)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory at --out."),
) -> None:
    """Train a LUT student with KD against a teacher cache; `torchrun --nproc_per_node N` runs DDP.

    Fresh: `lutq train --cache C --preset q2a4 --out RUN` (or `--init CKPT`). Resume after a kill:
    `lutq train --resume RUN` (flags given with --resume override the saved config, e.g. --steps).
    """
    from lutq.evaluate.compare import format_paired
    from lutq.evaluate.uncertainty import LEVEL
    from lutq.train.config import TrainConfig
    from lutq.train.run_dir import RunDir
    from lutq.train.trainer import train

    if clip is None:
        clip = clip_old
    flags = {
        "cache": cache,
        "out": out,
        "model": model,
        "preset": preset,
        "init": init,
        "mode": mode,
        "init_lut": init_lut,
        "init_tighten": init_tighten,
        "init_calib_sequences": init_calib_sequences,
        "train_lut": train_lut,
        "latent": latent,
        "steps": steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup": warmup,
        "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay,
        "clip": clip,
        "log_every": log_every,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "save_every": save_every,
        "ppl_texts": ppl_text,
        "seed": seed,
        "device": device,
        "precision": precision,
        "grad_checkpointing": grad_checkpointing,
        "compile": compile,
        "loggers": logger,
    }
    overrides = {k: v for k, v in flags.items() if v is not None and v != []}
    kd = {
        k: v
        for k, v in {
            "temperature": temperature,
            "kd_weight": kd_weight,
            "hard_top1_weight": hard_top1_weight,
            "label_ce_weight": label_ce_weight,
            "full_kl_weight": full_kl_weight,
        }.items()
        if v is not None
    }
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise LutqError(f"--resume {resume} continues in place; drop --out {out}")
        if config is not None:
            raise LutqError(
                f"--resume {resume} continues the run's own config; drop --config {config} and pass the flags to change"
            )
        base = RunDir(resume).resume_config()  # the latest resume's flags (e.g. a longer --steps) carry over
        source, overrides["out"] = f"{resume}/run.json", str(resume)
    else:
        base = TrainConfig.from_file(config).to_dict() if config else {}
        source = str(config or "lutq train")
        if "cache" not in {**base, **overrides} or "out" not in {**base, **overrides}:
            raise LutqError("lutq train needs --cache and --out (or --resume RUN)")
    cfg = TrainConfig.from_dict({**base, **overrides, "kd": {**base.get("kd", {}), **kd}}, source=source)
    result = train(cfg, resume=resume is not None, overwrite=overwrite)
    console.print(
        f"run: {result.run_dir} (step {result.step}, {result.tokens:,} tokens, "
        f"{result.elapsed_s:.1f} s); best val loss {result.best_eval_loss} at step {result.best_step}"
    )
    if changes := [
        f"{k[5:]} {format_paired(v)}"
        for k, v in result.eval_change.items()
        if k in ("eval_loss", "eval_top1_agree") or k.startswith("eval_ppl_")
    ]:
        console.print(f"change from step 0 ({LEVEL:.0%} CI, paired): " + "; ".join(changes))


def plot_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (from lutq train)."),
    out: Path = typer.Option(Path("loss.png"), "--out", "-o", help="PNG file to write."),
    logy: bool = typer.Option(False, "--logy", help="Logarithmic loss axis."),
) -> None:
    """Draw train and validation loss curves (the training objective) of one or several runs into a PNG."""
    from lutq.train.plot import plot_runs

    console.print(f"wrote {plot_runs(runs, out, logy=logy)}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("plot")(plot_command)
