"""`lutq data prepare`: documents -> a flat token file for pretraining."""

from __future__ import annotations

from pathlib import Path

import typer

from lutq.core.console import console

data_app = typer.Typer(help="Prepare training data (pretraining token files).", no_args_is_help=True)


def split_sources(values: list[str]) -> list[str]:
    """Repeated --source values; a value that is not an existing path may list several, comma-separated."""
    out: list[str] = []
    for v in values:
        out += [v] if Path(v).exists() else [s.strip() for s in v.split(",") if s.strip()]
    return out


@data_app.command("prepare")
def prepare(
    tokenizer: str = typer.Option(
        "gpt2",
        "--tokenizer",
        "-t",
        help="gpt2 (offline GPT-2 BPE), a model asset (smollm2-135m-instruct) or an HF tokenizer directory.",
    ),
    source: list[str] = typer.Option(
        ...,
        "--source",
        "-s",
        help="Corpus asset (shakespeare, bible, python-docs, sharegpt), .txt/.json/"
        ".jsonl file or directory, or hf:NAME[:split]. Repeat or comma-separate.",
    ),
    tokens: str = typer.Option(
        None, "--max-tokens", help="Stop after this many tokens (K/M/B suffixes: 100M, 1B; default: all)."
    ),
    tokens_old: str = typer.Option(None, "--tokens", hidden=True, help="Old spelling of --max-tokens."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (its meta goes to OUT.meta.json)."),
    workers: int = typer.Option(0, "--workers", help="Tokenizer processes (0: min(8, CPUs); 1: in-process)."),
) -> None:
    """Tokenize documents in parallel into a flat uint16/uint32 .npy memmap with EOS between documents."""
    from lutq.data.tokens import prepare_tokens
    from lutq.pretrain.schedule import parse_count

    tokens = tokens if tokens is not None else tokens_old
    max_tokens = parse_count(tokens, "--max-tokens") if tokens else None
    data = prepare_tokens(tokenizer, split_sources(source), out, max_tokens=max_tokens, workers=workers or None)
    m = data.meta
    console.print(
        f"tokenizer {m['tokenizer']} (vocab {m['vocab_size']:,}, eos {m['eos_id']}), "
        f"{m['documents']:,} documents, {m['tokens']:,} tokens -> {data.path}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
