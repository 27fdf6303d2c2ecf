"""CLI: `lutq quantize`, `lutq convert q4-to-q2 | latent-to-frozen`, `lutq snap` (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path

import typer

from lutq.core.console import console
from lutq.core.device import DEVICE_HELP
from lutq.core.errors import LutqError
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES

PTQ_DEVICE_HELP = (
    "Where PTQ / GPTQ / block-wise calibration runs: "
    + DEVICE_HELP
    + " The CUDA path is not yet measured on a GPU (docs/gpu.md)."
)


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError as e:
        raise LutqError(f"{flag}: expected LUT_SIZE,RANK like 4,32, got {text!r}") from e
    return a, b


def _load_quantized(ckpt: Path):
    from lutq.models import load_checkpoint
    from lutq.quant import lut_layers

    model, tok, info = load_checkpoint(ckpt)
    if not any(True for _ in lut_layers(model)):
        raise LutqError(f"{ckpt}: not a LUT checkpoint (no quantized layers); run `lutq quantize` first")
    return model, tok, info


def quantize_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Asset name, HF dir, .gguf, checkpoint or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    preset: str = typer.Option("q2a4", "--preset", "-p", help="q2a4 | q4a4 | q4a4_r32 | q2a2."),
    config: Path | None = typer.Option(None, "--config", help="QuantConfig as .toml/.json (overrides --preset)."),
    tighten: int | None = typer.Option(None, "--tighten", help="Least-squares tighten rounds per layer."),
    lut: str | None = typer.Option(None, "--lut", help="LUT kind for every layer: uniform | kmeans."),
    group_size: int | None = typer.Option(None, "--group-size", help="Inputs per group of the scale init map."),
    latent: bool = typer.Option(False, "--latent", help="Keep a trainable FP weight (latent mode, STE)."),
    calib: list[str] | None = typer.Option(
        None,
        "--calib",
        help="GPTQ index picking on this data: a KD cache directory or a data source (sharegpt, file.jsonl, ...); "
        "repeat it for an even mix (--calib CACHE --calib bible).",
    ),
    calib_sequences: int = typer.Option(CALIB_SEQUENCES, "--calib-sequences", help="Calibration sequences."),
    calib_len: int = typer.Option(CALIB_LEN, "--calib-len", help="Tokens per calibration sequence (data sources)."),
    damp: float | None = typer.Option(None, "--damp", help="GPTQ damping, a fraction of the mean diag(H)."),
    act_power: float | None = typer.Option(
        None,
        "--act-power",
        help="With --calib: weight each input column of the LUT / scale init by (H_jj / mean)^P (default 0.5; 0: off).",
    ),
    blockwise: bool = typer.Option(
        False,
        "--blockwise/--one-shot",
        help="With --calib: calibrate block by block "
        "on the quantized prefix's inputs (sequential GPTQ + output reconstruction).",
    ),
    recon_steps: int = typer.Option(
        0,
        "--recon-steps",
        help="--blockwise: Adam steps per block on the scales to "
        "reproduce the FP block outputs (0: sequential GPTQ only).",
    ),
    recon_lr: float = typer.Option(1e-3, "--recon-lr", help="--blockwise: learning rate of the reconstruction."),
    recon_latent_steps: int = typer.Option(
        0,
        "--recon-latent-steps",
        help="--blockwise: first, Adam steps per block on latent weights (indices move), before the scale steps.",
    ),
    recon_latent_lr: float | None = typer.Option(
        None, "--recon-latent-lr", help="--blockwise: latent learning rate, in scale units (W / S; default 2.5e-4)."
    ),
    recon_latent_start: str = typer.Option(
        "weff",
        "--recon-latent-start",
        help="--blockwise: latent weights start at W_eff (weff) or at the FP weight clipped into its bin (fp).",
    ),
    per_layer: bool = typer.Option(True, "--per-layer/--summary", help="Print every layer or group means."),
    device: str = typer.Option("cpu", "--device", help=PTQ_DEVICE_HELP),
) -> None:
    """Quantize a model to LUT layers, print the per-layer init error table, save a checkpoint."""
    from lutq.data import one_or_mix
    from lutq.quant import QuantConfig, get_preset
    from lutq.quant.api import quantize_checkpoint

    cfg = QuantConfig.from_file(config) if config else get_preset(preset)
    if lut:
        cfg = cfg.with_lut_kind(lut)
    cfg = cfg.replace(
        tighten_rounds=tighten,
        group_size=group_size,
        mode="latent" if latent else None,
        gptq_damp=damp,
        init_act_power=act_power,
    )
    if blockwise and not calib:
        raise LutqError("quantize: --blockwise needs --calib (the data the blocks are calibrated on)")
    recon = None
    if blockwise:
        from lutq.quant.reconstruct import ReconstructConfig

        recon = ReconstructConfig().replace(
            steps=recon_steps,
            lr=recon_lr,
            latent_steps=recon_latent_steps,
            latent_lr=recon_latent_lr,
            latent_start=recon_latent_start,
        )
    report = quantize_checkpoint(
        model,
        out,
        cfg,
        calib=one_or_mix(calib),
        calib_sequences=calib_sequences,
        calib_len=calib_len,
        blockwise=recon,
        device=device,
    )
    console.print(report.table(per_layer=per_layer))
    console.print(f"saved {out}")


def convert_q4_to_q2_cmd(
    ckpt: Path = typer.Argument(..., help="Input q4 LUT checkpoint."),
    out: Path = typer.Argument(..., help="Output checkpoint directory."),
    mlp: str = typer.Option("4,32", "--mlp", help="MLP target LUT_SIZE,RANK."),
    attn: str = typer.Option("16,8", "--attn", help="Attention target LUT_SIZE,RANK."),
    tighten: int = typer.Option(0, "--tighten", help="Least-squares tighten rounds per layer."),
    calib: list[str] | None = typer.Option(
        None, "--calib", help="GPTQ index picking on this data (KD cache or source); repeat it for an even mix."
    ),
    calib_sequences: int = typer.Option(CALIB_SEQUENCES, "--calib-sequences", help="Calibration sequences."),
    calib_len: int = typer.Option(CALIB_LEN, "--calib-len", help="Tokens per calibration sequence (data sources)."),
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="With --calib: the FP model to calibrate "
        "against block by block (sequential GPTQ on FP weights + reconstruction).",
    ),
    recon_steps: int = typer.Option(0, "--recon-steps", help="--reference: Adam steps per block on the scales."),
    recon_lr: float = typer.Option(1e-3, "--recon-lr", help="--reference: learning rate of the reconstruction."),
    act_power: float | None = typer.Option(
        None,
        "--act-power",
        help="With --calib (no --reference): weight each "
        "input column of the LUT reduction and tighten refits by (H_jj / mean)^P "
        "(default: the checkpoint's init_act_power, 0.5; 0: off).",
    ),
    device: str = typer.Option("cpu", "--device", help=PTQ_DEVICE_HELP),
) -> None:
    """Q4 → Q2: k-means the LUTs down (usage × S² weighted), expand ranks, re-pick indices; print errors."""
    from lutq.data import one_or_mix
    from lutq.quant.convert import convert_checkpoint

    blockwise = {"steps": recon_steps, "lr": recon_lr} if reference else None
    convert_checkpoint(
        ckpt,
        out,
        _pair(mlp, "--mlp"),
        _pair(attn, "--attn"),
        tighten_rounds=tighten,
        calib=one_or_mix(calib),
        calib_sequences=calib_sequences,
        calib_len=calib_len,
        reference=reference,
        blockwise=blockwise,
        act_power=act_power,
        device=device,
    )
    console.print(f"saved {out}")


def convert_latent_cmd(
    ckpt: Path = typer.Argument(..., help="Input latent-mode LUT checkpoint."),
    out: Path = typer.Argument(..., help="Output checkpoint directory."),
) -> None:
    """Latent → frozen: fix the indices from the trained FP weights and drop those weights."""
    from lutq.models import save_checkpoint
    from lutq.models.checkpoint import check_checkpoint_out
    from lutq.quant import freeze_latent

    check_checkpoint_out(out, ckpt)
    model, tok, info = _load_quantized(ckpt)
    n = freeze_latent(model)
    if n == 0:
        raise LutqError(f"{ckpt}: no latent layers to freeze")
    save_checkpoint(out, model, tok, extra={**info.extra, "converted": {"from": str(ckpt), "kind": "latent-to-frozen"}})
    console.print(f"froze {n} latent layers; saved {out}")


def snap_cmd(
    ckpt: Path = typer.Argument(..., help="LUT checkpoint to snap."),
    out: Path | None = typer.Argument(None, help="Output directory (default: rewrite CKPT in place, atomically)."),
    probe_tokens: int = typer.Option(64, "--probe-tokens", help="Length of the random probe sequences."),
    probe_batch: int = typer.Option(2, "--probe-batch", help="Number of probe sequences."),
) -> None:
    """Round LUT, baked Â·g, B̂ and biases to FP16 on the CPU, re-pick indices, verify on a probe batch."""
    import torch

    from lutq.models import save_checkpoint
    from lutq.models.checkpoint import check_checkpoint_out
    from lutq.quant import snap_model

    for flag, value in (("--probe-tokens", probe_tokens), ("--probe-batch", probe_batch)):
        if value < 1:
            raise LutqError(f"snap: {flag} must be at least 1, got {value}")
    if out is not None:
        check_checkpoint_out(out, ckpt)
    model, tok, info = _load_quantized(ckpt)
    vocab = int(model.config.vocab_size)
    probe = torch.randint(0, vocab, (probe_batch, probe_tokens), generator=torch.Generator().manual_seed(0))
    report = snap_model(model, probe)
    console.print(report.summary())
    target = out or ckpt
    save_checkpoint(
        target,
        model,
        tok,
        extra={
            **info.extra,
            "snap": {"max_abs_logit_error": report.max_abs_error, "rel_logit_error": report.rel_error},
        },
    )
    console.print(f"saved {target}")


def register(app: typer.Typer) -> None:
    """Add quantize, convert (q4-to-q2, latent-to-frozen) and snap to the lutq app."""
    app.command("quantize")(quantize_cmd)
    convert = typer.Typer(help="Convert a LUT checkpoint (q4-to-q2, latent-to-frozen).", no_args_is_help=True)
    convert.command("q4-to-q2")(convert_q4_to_q2_cmd)
    convert.command("latent-to-frozen")(convert_latent_cmd)
    app.add_typer(convert, name="convert")
    app.command("snap")(snap_cmd)
