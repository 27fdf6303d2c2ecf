"""`lutq bench qat|lut-linear|cache|pretrain`: measured throughput, step time, memory, MFU; table + JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from lutq.core.console import console
from lutq.core.device import DEVICE_HELP

bench_app = typer.Typer(
    help="Measure throughput (tokens/s), step time, peak memory and MFU; print a table, write JSON (--json).",
    no_args_is_help=True,
)

JSON_OPT = typer.Option(None, "--json", help="Also write the results (with device, command, date) to this file.")
DEVICE_OPT = typer.Option("auto", "--device", help=DEVICE_HELP)


def _old(new, old):
    """The value of a renamed option: its old (hidden) spelling wins when given, else the new one."""
    return new if old is None or old == [] else old


@bench_app.command("qat")
def qat(
    shape: str = typer.Option(
        "auto",
        "--shape",
        help="small | tiny | smollm2-135m | qwen3-0.6b (auto: small on "
        "CPU, qwen3-0.6b on GPU). Random weights, built from the config, no download.",
    ),
    preset: str = typer.Option("q2a4", "--preset", "-p", help="Quantization preset: q2a4 | q4a4 | q4a4_r32 | q2a2."),
    mode: str = typer.Option("all", "--mode", help="Trainable set (all, mlp-only, attn-only, g-only, ...)."),
    seq_len: list[int] = typer.Option(
        [64, 128], "--seq-len", "-L", help="Sequence length(s) L in tokens (repeat the option)."
    ),
    batch: int = typer.Option(0, "--batch-size", "-b", help="Sequences per step (0: 4 on CPU, 64 on GPU)."),
    batch_old: int = typer.Option(None, "--batch", hidden=True, help="Old spelling of --batch-size."),
    topk: int = typer.Option(64, "--top-k", "-K", help="Teacher top-K of the synthetic batch."),
    topk_old: int = typer.Option(None, "--topk", hidden=True, help="Old spelling of --top-k."),
    dtype: list[str] = typer.Option(
        ["auto"],
        "--precision",
        help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 "
        "(autocast, fp32 master weights, as `lutq train --precision bf16`); repeatable.",
    ),
    dtype_old: list[str] = typer.Option(None, "--dtype", hidden=True, help="Old spelling of --precision."),
    forward: list[str] = typer.Option(
        ["materialized", "factored"], "--forward", help="materialized | factored; repeatable."
    ),
    grad_ckpt: str = typer.Option("both", "--grad-ckpt", help="off | on | both."),
    hard_top1_weight: float = typer.Option(
        0.0, "--hard-top1-weight", help="Weight of the full-vocab hard CE term (0: pure top-K KD)."
    ),
    full_kl_weight: float = typer.Option(
        0.0, "--full-kl-weight", help="Weight of the full-vocab tail-bucket KL term (0: off)."
    ),
    steps: int = typer.Option(3, "--steps", help="Timed optimizer steps per configuration."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed warmup steps per configuration."),
    compile_: bool = typer.Option(
        False,
        "--compile",
        help="Compile the decoder layers, as `lutq train --compile` does (warmup steps include the compilation).",
    ),
    profile: Path = typer.Option(
        None,
        "--profile",
        help="Append a torch.profiler ops table of each configuration (self time, top 30) to this text file.",
    ),
    device: str = DEVICE_OPT,
    find_max: bool = typer.Option(
        False,
        "--find-max-batch",
        help="Binary-search the largest batch that fits (GPU) and report the best-throughput batch per configuration.",
    ),
    max_batch: int = typer.Option(2048, "--max-batch", help="Upper bound of the --find-max-batch search."),
    json_out: Path = JSON_OPT,
) -> None:
    """Time a full KD-QAT training step (student forward + KD loss + backward + AdamW) on a synthetic batch."""
    from lutq.bench.qat import QATBenchConfig, bench_qat
    from lutq.bench.report import print_stats, write_json
    from lutq.core.errors import LutqError

    batch, topk, dtype = _old(batch, batch_old), _old(topk, topk_old), _old(dtype, dtype_old)
    ckpt = {"off": (False,), "on": (True,), "both": (False, True)}.get(grad_ckpt)
    if ckpt is None:
        raise LutqError(f"--grad-ckpt must be off, on or both, got {grad_ckpt!r}")
    cfg = QATBenchConfig(
        shape=shape,
        preset=preset,
        mode=mode,
        seq_lens=tuple(seq_len),
        batch=batch,
        topk=topk,
        dtypes=tuple(dtype),
        forwards=tuple(forward),
        grad_ckpt=ckpt,
        steps=steps,
        warmup=warmup,
        hard_top1_weight=hard_top1_weight,
        full_kl_weight=full_kl_weight,
        device=device,
        find_max_batch=find_max,
        max_batch_hi=max_batch,
        compile=compile_,
        profile=str(profile) if profile else "",
    )

    def on_probe(label: str, p) -> None:
        s = p.stats
        console.print(
            f"  {label} batch {p.batch}: "
            + (f"ok {s.tokens_per_s:,.0f} tok/s, {s.peak_mem_mb:,.0f} MB" if p.ok else f"OOM ({p.error})")
        )

    res = bench_qat(cfg, on_probe=on_probe)
    print_stats(f"KD-QAT training step on {res.device}", res.rows)
    for label, mb in res.max_batch.items():
        console.print(
            f"{label}: max batch {mb.max_batch}{' (upper bound)' if mb.hit_upper_bound else ''}, "
            f"best {mb.best.tokens_per_s:,.0f} tokens/s at batch {mb.best.batch}"
        )
    if json_out:
        write_json(json_out, "qat", res.config.device, res.config.to_dict(), res.to_dict())
        console.print(f"wrote {json_out}")


@bench_app.command("cache")
def cache(
    model: str = typer.Option(
        "smollm2-135m-instruct",
        "--model",
        "-m",
        help="Teacher (asset, HF dir, lutq checkpoint), or shape:NAME: random weights of a "
        "`bench qat` shape (shape:smollm2-135m), nothing to fetch.",
    ),
    seq_len: int = typer.Option(128, "--seq-len", "-L", help="Tokens per sequence (L)."),
    topk: int = typer.Option(64, "--top-k", "-K", help="Teacher top-K logits stored per position (K)."),
    topk_old: int = typer.Option(None, "--topk", hidden=True, help="Old spelling of --top-k."),
    negatives: int = typer.Option(0, "--negatives", "-R", help="Random negative ids per position (R)."),
    batch: int = typer.Option(8, "--batch-size", "-b", help="Sequences per teacher forward."),
    batch_old: int = typer.Option(None, "--batch", hidden=True, help="Old spelling of --batch-size."),
    batches: int = typer.Option(4, "--batches", help="Timed batches."),
    device: str = DEVICE_OPT,
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16."),
    json_out: Path = JSON_OPT,
) -> None:
    """Cache-writing tokens/s vs a bare teacher forward on the same tokens (lutq.kd.bench.bench_cache)."""
    from lutq.bench.report import print_dict, write_json
    from lutq.kd.bench import bench_cache

    topk, batch = _old(topk, topk_old), _old(batch, batch_old)
    res = bench_cache(model, L=seq_len, K=topk, batch=batch, n_batches=batches, R=negatives, device=device, dtype=dtype)
    print_dict(f"KD cache writing ({model})", res)
    if json_out:
        write_json(
            json_out,
            "cache",
            res.get("device", "cpu"),
            {"model": model, "seq_len": seq_len, "topk": topk, "negatives": negatives, "batch": batch},
            res,
        )
        console.print(f"wrote {json_out}")


@bench_app.command("lut-linear")
def lut_linear(
    out_features: int = typer.Option(3072, "--out-features", help="Output features (Qwen3-0.6B gate/up: 3072)."),
    out_old: int = typer.Option(None, "--out", hidden=True, help="Old spelling of --out-features."),
    in_features: int = typer.Option(1024, "--in-features", help="Input features (Qwen3-0.6B gate/up: 1024)."),
    in_old: int = typer.Option(None, "--in", hidden=True, help="Old spelling of --in-features."),
    tokens: int = typer.Option(2048, "--tokens", help="Rows of the input (batch x seq)."),
    rank: int = typer.Option(32, "--rank", help="Scale rank."),
    lut_size: int = typer.Option(4, "--lut-size", help="LUT entries (4: 2-bit, 16: 4-bit)."),
    steps: int = typer.Option(5, "--steps", help="Timed training steps (materialized form)."),
    factored_steps: int = typer.Option(1, "--factored-steps", help="Timed steps of the factored form (0: skip)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed steps of each variant (compilation included)."),
    compile_: bool = typer.Option(False, "--compile", help="Also time torch.compile of the materialized layer."),
    device: str = DEVICE_OPT,
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16."),
    json_out: Path = JSON_OPT,
) -> None:
    """One LUTLinear training step (materialized and factored) vs nn.Linear of the same shape
    (lutq.quant.bench.bench_lut_linear)."""
    import torch

    from lutq.bench.report import print_dict, write_json
    from lutq.core.errors import LutqError
    from lutq.quant.bench import bench_lut_linear

    out_features, in_features = _old(out_features, out_old), _old(in_features, in_old)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise LutqError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    res = bench_lut_linear(
        out_features,
        in_features,
        tokens,
        rank,
        lut_size,
        steps,
        dev,
        dtypes[dtype],
        warmup=warmup,
        factored_steps=factored_steps,
        compile=compile_,
    )
    print_dict(f"LUTLinear training step {out_features}x{in_features}, {tokens} tokens", res)
    if json_out:
        write_json(json_out, "lut-linear", dev, {"dtype": dtype, "compile": compile_}, res)
        console.print(f"wrote {json_out}")


@bench_app.command("pretrain")
def pretrain(
    size: str = typer.Option("tiny", "--size", help="Model size preset (tiny, small, medium, 1b)."),
    variant: str = typer.Option(
        "baseline", "--variant", help="Attention variant (baseline, gqa, bottleneck, decoupled)."
    ),
    seq_len: int = typer.Option(256, "--seq-len", "-L", help="Sequence length in tokens."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Sequences per step."),
    steps: int = typer.Option(10, "--steps", help="Timed optimizer steps."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warmup steps."),
    dtype: str = typer.Option(
        "auto", "--precision", help="auto, fast, fp32, bf16-mixed, bf16 (as `lutq pretrain --precision`)."
    ),
    dtype_old: str = typer.Option(None, "--dtype", hidden=True, help="Old spelling of --precision."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | lion."),
    grad_ckpt: bool = typer.Option(
        False, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward (less memory)."
    ),
    grad_ckpt_old: bool = typer.Option(None, "--grad-ckpt", hidden=True, help="Old spelling of --grad-checkpointing."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    device: str = DEVICE_OPT,
    json_out: Path = JSON_OPT,
) -> None:
    """Pretraining step throughput and MFU on random tokens (lutq.pretrain.bench.bench_pretrain)."""
    from lutq.bench.report import print_dict, write_json
    from lutq.core.errors import LutqError
    from lutq.pretrain.bench import bench_pretrain
    from lutq.pretrain.config import PRECISIONS

    dtype, grad_ckpt = _old(dtype, dtype_old), _old(grad_ckpt, grad_ckpt_old)
    if dtype not in PRECISIONS:
        raise LutqError(f"--precision must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    res = bench_pretrain(
        size,
        variant,
        seq_len,
        micro_batch,
        steps,
        device,
        dtype,
        warmup=warmup,
        optimizer=optimizer,
        grad_checkpoint=grad_ckpt,
        compile=compile_,
    )
    print_dict(f"pretrain step: {size} {variant}", res)
    if json_out:
        write_json(json_out, "pretrain", res["device"], {"size": size, "variant": variant}, res)
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
