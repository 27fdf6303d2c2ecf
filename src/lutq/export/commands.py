"""`lutq export --format ane|hf|coreml CKPT OUT`."""

from __future__ import annotations

from pathlib import Path

import typer


def export_cmd(
    ckpt: str = typer.Argument(..., help="lutq checkpoint directory (or any model lutq can load, for hf)."),
    out: Path = typer.Argument(..., help="Output directory (replaced atomically)."),
    format: str = typer.Option("ane", "--format", "-f", help="ane | hf | coreml."),
    keep_dtype: bool = typer.Option(False, "--keep-dtype", help="ane: non-LUT tensors keep their dtype (not FP16)."),
    seq_len: int = typer.Option(128, "--seq-len", "-L", help="coreml: the program's static sequence length (tokens)."),
    deployment_target: str = typer.Option("iOS18", "--deployment-target", help="coreml: iOS18 or newer."),
    hf_dtype: str = typer.Option(None, "--dtype", help="hf: fp32 | fp16 | bf16 (default: as loaded, fp32)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload what was written and compare."),
) -> None:
    """Export a model: `ane` (FP16-snapped factored tensors + config.json, see docs/formats.md), `hf` (dense
    transformers dir, W_eff baked in) or `coreml` (.mlpackage with palettized weights; needs coremltools).
    Prints the size report (bits per weight per layer group and whole model) and the verification numbers."""
    from lutq.export.api import ExportConfig, export, print_result

    cfg = ExportConfig(
        format=format,
        keep_dtype=keep_dtype,
        seq_len=seq_len,
        deployment_target=deployment_target,
        hf_dtype=hf_dtype,
        verify=verify,
    )
    cfg.validate()
    print_result(export(ckpt, out, format, cfg))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
