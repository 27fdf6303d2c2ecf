"""`lutq cache ...` (build a KD cache) and `lutq cache verify DIR`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from lutq.core.device import DEVICE_HELP

cache_app = typer.Typer(
    help="Build a KD cache of teacher top-K logits (`lutq cache --model M --source S ...`) or check one "
    "(`lutq cache verify DIR`).",
    invoke_without_command=True,
    no_args_is_help=False,
)


@cache_app.callback()
def cache(
    ctx: typer.Context,
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", "-m", help="Teacher: asset, HF/lutq dir, .gguf, hub id."
    ),
    source: list[str] = typer.Option(
        ["sharegpt"],
        "--source",
        "-s",
        help="Data: asset (sharegpt, bible...), .txt/.json/.jsonl, dir, hf:NAME; repeat for an even mix.",
    ),
    source_weight: list[float] = typer.Option(
        None, "--source-weight", help="A mix's shares: one weight per --source, in order (default: even)."
    ),
    thinking: str = typer.Option("off", "--thinking", help="Chat rendering: off | on | both | none (raw)."),
    seq_len: int = typer.Option(128, "-L", "--seq-len", help="Tokens per sequence (L)."),
    top_k: int = typer.Option(64, "-K", "--top-k", help="Teacher top-K logits kept per position (K)."),
    negatives: int = typer.Option(0, "-R", "--negatives", help="Random negative ids per position (R)."),
    sequences: int = typer.Option(1000, "--sequences", "-n", help="Sequences in the cache (train + val)."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Instead of --sequences: a token budget (sequences = tokens / L)."
    ),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of sequences held out."),
    val_blocks_per_document: int = typer.Option(
        0,
        "--val-blocks-per-doc",
        help="At most this many val sequences per held-out document, spread over it (more independent "
        "conversations for the KD intervals); 0 = val packed like train.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per teacher forward."),
    seed: int = typer.Option(0, "--seed", help="Seed for document order and negatives."),
    shard_size: int = typer.Option(1024, "--shard-size", help="Sequences per shard file."),
    out: Path = typer.Option(None, "--out", "-o", help="Output dir (default $LUTQ_HOME/caches/<name>)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with other settings."),
) -> None:
    """Run the teacher over packed L-token blocks and store its top-K logits; resumes after a kill."""
    if ctx.invoked_subcommand is not None:
        return
    from lutq.core import LutqError, console
    from lutq.data import one_or_mix
    from lutq.kd.cache import CacheConfig, build_cache

    given = getattr(ctx.get_parameter_source("sequences"), "name", None)  # typer may carry its own click
    if max_tokens is not None and given == "COMMANDLINE":
        raise LutqError(f"cache: give --sequences ({sequences}) or --max-tokens ({max_tokens}), not both")
    cfg = CacheConfig(
        model=model,
        source=one_or_mix(source),
        source_weights=list(source_weight) if source_weight else None,
        thinking=thinking,
        seq_len=seq_len,
        top_k=top_k,
        negatives=negatives,
        num_sequences=sequences,
        max_tokens=max_tokens,
        val_fraction=val_fraction,
        val_blocks_per_document=val_blocks_per_document,
        batch_size=batch_size,
        seed=seed,
        shard_size=shard_size,
        out=out,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
    )
    path = build_cache(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun, rank 0 reports
    meta = json.loads((path / "meta.json").read_text())
    runs = json.loads((path / "build.json").read_text())["runs"]
    rate = runs[-1]["rank0"]["tokens_per_s"]
    n = meta["sequences"]
    console.print(
        f"[bold green]cache[/] {path}: {n['train']} train + {n['val']} val sequences of "
        f"{meta['L']} tokens, {meta['bytes'] / 2**20:.1f} MiB"
    )
    print(f"bytes/token: {meta['bytes_per_token']:.1f}")
    print(f"tokens/s: {rate:,.0f}" + ("" if runs[-1]["rank0"]["tokens"] else " (nothing left to write)"))
    print(path)


@cache_app.command("verify")
def verify(
    path: Path = typer.Argument(..., help="KD cache directory."),
    n: int = typer.Option(4, "--sequences", "-n", help="Sequences to re-run through the teacher."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Check shard checksums and re-run the teacher on a few sequences to compare the stored logits."""
    from lutq.core import LutqError, console
    from lutq.kd.verify import verify_cache

    report = verify_cache(path, n, device=device)
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        diff, atol, rtol = report["max_abs_diff"], report["atol"], report["rtol"]
        lse = report.get("lse_max_abs_diff")
        raise LutqError(
            f"{path}: stored logits differ from the teacher's (max |diff| {diff:.4g}"
            + (f", log-sum-exp {lse:.4g}" if lse is not None else "")
            + f"; tolerance {atol} + {rtol:.3g}·|x|)"
        )
    console.print(f"[bold green]ok[/] {path}: {report['positions']} positions match the teacher")


def register(app: typer.Typer) -> None:
    """Add `lutq cache` (with its `verify` subcommand)."""
    app.add_typer(cache_app, name="cache")
