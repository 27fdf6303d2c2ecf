"""`lutq eval ppl|kd|compare` and `lutq chat`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lutq.core.console import console
from lutq.core.device import DEVICE_HELP, resolve_device

eval_app = typer.Typer(help="Evaluate models: perplexity, KD metrics, comparison tables.", no_args_is_help=True)

MODEL_HELP = "Model: lutq checkpoint dir, HF dir, .gguf file, asset name or hub id."
TEXT_HELP = "Text: FILE (.txt/.json/.jsonl, optional :train/:val), ASSET[:split] (e.g. shakespeare:val) or hf:NAME."


@eval_app.command("ppl")
def ppl_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    text: list[str] = typer.Option(..., "--text", "-t", help=TEXT_HELP + " Repeat for several texts."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per window."),
    stride: int = typer.Option(512, "--stride", help="Window step in tokens; tokens scored per window (< max length)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Windows per forward pass."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Score only the first N tokens of each text (default: all)."
    ),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Sliding-window perplexity with its 95% interval (documents joined by a blank line; every token after the
    first scored once)."""
    from lutq.core.atomic import atomic_write_json
    from lutq.evaluate.compare import load_text
    from lutq.evaluate.perplexity import PplConfig, perplexity
    from lutq.evaluate.size import model_size, size_table
    from lutq.models import load_model

    # bad window options and text specs fail before the model loads
    PplConfig(max_length=max_length, stride=stride, batch_size=batch_size, max_tokens=max_tokens).validate()
    texts = {spec: load_text(spec) for spec in text}
    m, tok = load_model(model, dtype=dtype, device=resolve_device(device))
    size = model_size(m)
    console.print(size_table(size, title=f"size of {model}"))
    results = {}
    for spec in text:
        r = perplexity(
            m, tok, texts[spec], max_length=max_length, stride=stride, batch_size=batch_size, max_tokens=max_tokens
        )
        results[spec] = r.to_dict()
        print(
            f"{spec}: ppl {r.ppl:.4f} ({r.interval_text()})  (nll {r.nll:.4f} nats/token, {r.tokens} tokens, "
            f"window {max_length}/{stride})"
        )
    if json_out:
        atomic_write_json(json_out, {"model": model, "size": size, "ppl": results})


@eval_app.command("kd")
def kd_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    cache: Path = typer.Option(..., "--cache", "-c", help="KD cache directory (lutq cache)."),
    split: str = typer.Option("val", "--split", help="Cache split: val or train."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per batch."),
    max_batches: int = typer.Option(None, "--max-batches", help="Stop after N batches (default: the whole split)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    json_out: Path = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
) -> None:
    """KD loss, KL and top-1 agreement of a model against a teacher cache's validation split, each with its 95%
    interval over the split's documents (`ci`, `unit`, `units`), and per source of a mixed cache (`by_source`;
    JSON on stdout)."""
    from lutq.core.atomic import atomic_write_json
    from lutq.evaluate.compare import kd_intervals, unit_columns
    from lutq.kd import KDCache, evaluate_kd
    from lutq.kd.loss import kd_unit
    from lutq.models import load_model

    m, tok = load_model(model, device=resolve_device(device))
    kd_cache = KDCache(cache)
    kd_cache.check_tokenizer(tok, m)
    units: list[dict[str, float]] = []
    metrics = evaluate_kd(
        m, kd_cache, split=split, batch_size=batch_size, max_batches=max_batches, per_unit=units, by_source=True
    )
    ci = kd_intervals(unit_columns(units))
    out = {**metrics, "ci": ci, "unit": kd_unit(kd_cache, split), "units": len(units)}
    print(json.dumps(out, indent=2))
    if json_out:
        atomic_write_json(json_out, {"model": model, "cache": str(cache), "split": split, "kd": out})


@eval_app.command("compare")
def compare_cmd(
    models: list[str] = typer.Argument(..., help="Models to compare (checkpoints, HF dirs, assets)."),
    text: list[str] = typer.Option(None, "--text", "-t", help=TEXT_HELP + " Repeatable."),
    cache: Path = typer.Option(None, "--cache", "-c", help="KD cache for KD loss / KL / top-1 agreement."),
    max_length: int = typer.Option(1024, "--max-length", help="Perplexity window, in tokens."),
    stride: int = typer.Option(512, "--stride", help="Perplexity window step, in tokens."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Perplexity windows per forward pass."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Score only the first N tokens of each text (default: all)."
    ),
    kd_max_batches: int = typer.Option(
        None, "--kd-max-batches", help="Stop the KD evaluation after N batches (default: the whole val split)."
    ),
    reference: str = typer.Option(
        None, "--reference", help="Pair the others against this model (label or spec; default: the first)."
    ),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    json_out: Path = typer.Option(None, "--json", help="Also write the table as JSON here."),
    markdown_out: Path = typer.Option(None, "--markdown", help="Also write the table as markdown here."),
) -> None:
    """One table (markdown on stdout, optional JSON/markdown files): ppl per text, KD metrics, size, bits/weight;
    then each model against the first one (or --reference): perplexity change and KD differences, paired on the
    same tokens and batches, with 95% intervals."""
    from lutq.core.atomic import atomic_write_json, atomic_write_text
    from lutq.evaluate.compare import compare
    from lutq.evaluate.size import size_table

    result = compare(
        list(models),
        texts=list(text or []),
        cache=cache,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        kd_max_batches=kd_max_batches,
        device=str(resolve_device(device)),
        reference=reference,
    )
    for row in result.rows():
        if row["size"]["lut"]:
            console.print(size_table(row["size"], title=f"size of {row['label']}"))
    md = result.markdown()
    print(md)
    if json_out:
        atomic_write_json(json_out, result.to_dict())
    if markdown_out:
        atomic_write_text(markdown_out, md)


def chat_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    prompt: str = typer.Option(None, "--prompt", "-p", help="One-shot prompt; without it, an interactive loop."),
    system: str = typer.Option(None, "--system", help="System message."),
    thinking: bool = typer.Option(
        None,
        "--thinking/--no-thinking",
        help="Thinking on/off for templates that support it (Qwen3); default: template's.",
    ),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling probability mass (0-1]."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="Repetition penalty (1.0 = off)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Tokens generated per reply, at most."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default: unseeded)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16."),
) -> None:
    """Chat with a model (lutq checkpoint, snapped or not, or an FP model); replies stream as they are generated."""
    from lutq.evaluate.chat import ChatConfig, generate_reply
    from lutq.models import load_model

    cfg = ChatConfig(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        thinking=thinking,
        system=system,
        seed=seed,
    )
    cfg.validate()
    m, tok = load_model(model, dtype=dtype, device=resolve_device(device))

    def stream(s: str) -> None:
        print(s, end="", flush=True)

    if prompt is not None:
        generate_reply(m, tok, [{"role": "user", "content": prompt}], cfg, on_text=stream)
        print()
        return
    console.print("[dim]interactive chat: empty line or Ctrl-D to quit, /reset to clear the history[/]")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = generate_reply(m, tok, history, cfg, on_text=stream)
        print()
        history.append({"role": "assistant", "content": reply})


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("chat")(chat_cmd)
