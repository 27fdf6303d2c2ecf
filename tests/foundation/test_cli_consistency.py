"""The CLI speaks one language: a concept has one long flag, one short flag and one type on every command that takes
it; every command and option explains itself; old spellings keep working but stay out of `--help` and the docs;
user errors are one verbatim line and a nonzero exit, never a traceback.

Only the CLI's structure is introspected (`typer.main.get_command`); the few commands that run are stopped at the
library call they would make (a monkeypatched function raises `Called`), so nothing loads a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- introspection


def commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += commands(sub, (*path, name))
    return out


@cache
def all_commands() -> tuple[tuple[tuple[str, ...], Any], ...]:
    return tuple(commands(get_command(app)))


def options(cmd: Any, hidden: bool = False) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option" and bool(p.hidden) == hidden]


def longs(p: Any) -> list[str]:
    return [o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def shorts(p: Any) -> frozenset[str]:
    return frozenset(o for o in (*p.opts, *p.secondary_opts) if not o.startswith("--"))


def kind(p: Any) -> str:
    """The option's value type, a repeatable list[X] counted as X (bench sweeps several values of one setting)."""
    ann = p.type_descriptor.annotation
    if get_origin(ann) in (Union, types.UnionType):  # `Path | None`
        ann = next(a for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is list:
        ann = get_args(ann)[0]
    return getattr(ann, "__name__", str(ann))


def name(path: tuple[str, ...]) -> str:
    return " ".join(("lutq", *path))


def uses_of(flag: str, hidden: bool = False) -> list[tuple[tuple[str, ...], Any]]:
    """(command path, option) for every command whose visible (or hidden) options include `flag`."""
    return [
        (path, p) for path, cmd in all_commands() for p in options(cmd, hidden) if flag in (*p.opts, *p.secondary_opts)
    ]


# ---------------------------------------------------------------------------------------------------- consistency

# concept: (canonical long flag, its short flag or None, value type or None, other spellings it must never have)
CONCEPTS: dict[str, tuple[str, str | None, str | None, set[str]]] = {
    "output path": ("--out", "-o", "Path", {"--output", "--out-dir", "--output-dir"}),
    "model": ("--model", "-m", "str", {"--model-path", "--teacher"}),
    "KD cache": ("--cache", "-c", "Path", {"--cache-dir"}),
    "text": ("--text", "-t", "str", {"--texts", "--corpus"}),
    "data source": ("--source", "-s", "str", {"--sources"}),
    "device": ("--device", None, "str", {"--dev"}),
    "seed": ("--seed", None, "int", {"--random-seed"}),
    "batch size": ("--batch-size", "-b", "int", {"--batch", "--bs"}),
    "machine output": ("--json", None, "Path", {"--json-out", "--output-json"}),
    "config file": ("--config", None, "Path", {"--cfg", "--config-file"}),
    "optimizer steps": ("--steps", None, "int", {"--num-steps", "--iters"}),
    "learning rate": ("--lr", None, "float", {"--learning-rate"}),
    "token cap": ("--max-tokens", None, None, {"--tokens"}),
    "teacher top-K": ("--top-k", "-K", "int", {"--topk"}),
    "sequence length": ("--seq-len", "-L", "int", {"--seqlen", "--sequence-length"}),
    "negatives": ("--negatives", "-R", "int", set()),
    "quantization preset": ("--preset", "-p", "str", set()),
    "format": ("--format", "-f", "str", set()),
    "tokenizer": ("--tokenizer", "-t", "str", set()),
    "autocast precision": ("--precision", None, "str", set()),
    "gradient checkpointing": ("--grad-checkpointing", None, "bool", {"--grad-checkpoint", "--grad-ckpt"}),
    "gradient clipping": ("--grad-clip", None, "float", {"--clip"}),
    "validation batches": ("--eval-batches", None, "int", {"--eval-iters"}),
    "replace existing output": ("--overwrite", None, "bool", {"--replace", "--clobber"}),
    "store": ("--store", None, "str", set()),
}

# Where another spelling is a different concept, not a second name for the same one (command, flag): reason.
OTHER_CONCEPT = {
    ("bench lut-linear", "--tokens"): "rows of the benchmark input, not a cap on a corpus",
    ("bench qat", "--grad-ckpt"): "a sweep selector off|on|both over the setting, not the setting itself",
}

# The same long flag with different value types (flag: reason). Everything else must agree.
TYPE_EXCEPTIONS = {
    "--thinking": "cache: how chat data is rendered (off|on|both|none); chat: a template toggle",
    "--force": "assets / store / pull: redo although up to date; speedrun: the stage to re-run (repeatable)",
    "--max-tokens": "data prepare takes K/M/B suffixes (100M) for corpus-sized counts",
    "--stop-after": "speedrun: after this stage (a name); pretrain: after N steps of this invocation",
}

# Short flags that mean different long flags on different commands (short: the long flags, and why kept).
SHORT_COLLISIONS = {
    "-p": ({"--preset", "--prompt"}, "documented `quantize -p q4a4`; `chat -p TEXT` as in every chat CLI"),
    "-t": ({"--text", "--tokenizer"}, "documented `eval -t shakespeare:val`; tokenizer commands take no text"),
}


@pytest.mark.parametrize("concept", CONCEPTS)
def test_a_concept_is_spelled_one_way(concept: str) -> None:
    long, short, typ, others = CONCEPTS[concept]
    uses = uses_of(long)
    assert uses, f"no command takes {long}: is the concept table stale?"
    problems = []
    for path, p in uses:
        if (short or None) and short not in shorts(p):
            problems.append(f"{name(path)} {long}: no short flag {short}")
        if typ and kind(p) != typ and long not in TYPE_EXCEPTIONS:
            problems.append(f"{name(path)} {long}: type {kind(p)}, elsewhere {typ}")
    for other in others:
        for path, _ in uses_of(other):
            if (" ".join(path), other) not in OTHER_CONCEPT:
                problems.append(f"{name(path)} spells {concept} {other}, not {long}")
    assert not problems, "\n".join(problems)


def test_a_long_flag_has_one_short_flag_and_one_type() -> None:
    by_long: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for path, cmd in all_commands():
        for p in options(cmd):
            for flag in longs(p)[:1]:
                by_long[flag].append((name(path), p))
    problems = []
    for flag, uses in sorted(by_long.items()):
        short_sets = {shorts(p) for _, p in uses}
        if len(short_sets) > 1:
            problems.append(f"{flag}: short flags differ: " + ", ".join(f"{n} {sorted(shorts(p))}" for n, p in uses))
        kinds = {(kind(p), bool(p.is_flag)) for _, p in uses}
        if len(kinds) > 1 and flag not in TYPE_EXCEPTIONS:
            problems.append(f"{flag}: types differ: " + ", ".join(f"{n} {kind(p)}" for n, p in uses))
    assert not problems, "\n".join(problems)


def test_a_short_flag_means_one_long_flag() -> None:
    by_short: dict[str, set[str]] = defaultdict(set)
    for _, cmd in all_commands():
        for p in options(cmd):
            for s in shorts(p):
                by_short[s].add(longs(p)[0])
    problems = [
        f"{s} means {sorted(ls)}"
        for s, ls in sorted(by_short.items())
        if len(ls) > 1 and ls != SHORT_COLLISIONS.get(s, (set(),))[0]
    ]
    assert not problems, "\n".join(problems)
    for s, (ls, _) in SHORT_COLLISIONS.items():  # an allowance that is no longer needed goes
        assert by_short[s] == ls, f"SHORT_COLLISIONS[{s!r}] is stale: {sorted(by_short[s])}"


def test_every_device_option_takes_auto_and_says_its_default() -> None:
    uses = uses_of("--device")
    assert len(uses) >= 12
    for path, p in uses:
        assert "auto" in p.help and "cuda:N" in p.help and "mps" in p.help, (name(path), p.help)
        assert p.default in ("auto", "cpu", None), (name(path), p.default)
        if p.default is None:  # not shown by --help: the text says it
            assert "Default: auto" in p.help, (name(path), p.help)


# ---------------------------------------------------------------------------------------------------- help texts


def test_every_command_and_option_explains_itself() -> None:
    problems = []
    for path, cmd in all_commands():
        if not (cmd.help or "").strip():
            problems.append(f"{name(path)}: no help")
        for p in cmd.params:
            text = (getattr(p, "help", None) or "").strip()
            where = f"{name(path)} {(longs(p) or [p.name])[0]}"
            if len(text) < 8:
                problems.append(f"{where}: help {text!r}")
            elif not text.endswith((".", ")")):  # a sentence, not a string cut short by a bad concatenation
                problems.append(f"{where}: help ends {text[-20:]!r}")
            elif "  " in text or " ," in text or ".." in text.replace("...", ""):
                problems.append(f"{where}: help {text!r}")
    assert not problems, "\n".join(problems)


def test_root_options() -> None:
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("lutq ") and len(r.output.split()) == 2, r.output
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    assert all(level in r.output for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")), r.output


# ---------------------------------------------------------------------------------------------------- old spellings

HIDDEN_ALIASES = {  # command: {old spelling: new spelling}
    "bench qat": {"--batch": "--batch-size", "--topk": "--top-k", "--dtype": "--precision"},
    "bench cache": {"--batch": "--batch-size", "--topk": "--top-k"},
    "bench lut-linear": {"--out": "--out-features", "--in": "--in-features"},
    "bench pretrain": {"--dtype": "--precision", "--grad-ckpt": "--grad-checkpointing"},
    "train": {"--clip": "--grad-clip"},
    "pretrain": {
        "--grad-checkpoint": "--grad-checkpointing",
        "--no-grad-checkpoint": "--no-grad-checkpointing",
        "--eval-iters": "--eval-batches",
    },
    "data prepare": {"--tokens": "--max-tokens"},
}


def _command(path: str) -> Any:
    return dict((" ".join(p), c) for p, c in all_commands())[path]


def test_old_spellings_are_hidden_aliases() -> None:
    found = {
        name(path)[5:]: {o for p in options(cmd, hidden=True) for o in (*p.opts, *p.secondary_opts)}
        for path, cmd in all_commands()
        if options(cmd, hidden=True)
    }
    assert found == {c: set(a) for c, a in HIDDEN_ALIASES.items()}
    for path, aliases in HIDDEN_ALIASES.items():
        shown = {o for p in options(_command(path)) for o in (*p.opts, *p.secondary_opts)}
        assert set(aliases.values()) <= shown, path
        help_text = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"}).output
        for old in aliases:
            assert f" {old} " not in help_text, (path, old)


class Called(Exception):
    """A stubbed library function was reached; its arguments ride along."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("called")
        self.args_, self.kwargs = args, kwargs


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise Called(*args, **kwargs)


def _call(args: list[str]) -> Called:
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, Called), (args, res.output, res.exception)
    return res.exception


@pytest.mark.parametrize("old", [False, True], ids=["new", "old"])
def test_renamed_options_reach_the_library(old: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each renamed option, in its new and in its old spelling, arrives where the library reads it."""

    def spell(cmd: str, new: str) -> str:
        return {v: k for k, v in HIDDEN_ALIASES[cmd].items()}[new] if old else new

    import lutq.bench.qat
    import lutq.data.tokens
    import lutq.kd.bench
    import lutq.pretrain.bench
    import lutq.pretrain.train
    import lutq.quant.bench
    import lutq.train.trainer

    for module, fn in [
        (lutq.bench.qat, "bench_qat"),
        (lutq.kd.bench, "bench_cache"),
        (lutq.quant.bench, "bench_lut_linear"),
        (lutq.pretrain.bench, "bench_pretrain"),
        (lutq.train.trainer, "train"),
        (lutq.pretrain.train, "pretrain"),
        (lutq.data.tokens, "prepare_tokens"),
    ]:
        monkeypatch.setattr(module, fn, _stop)

    c = "bench qat"
    cfg = _call(
        [
            "bench",
            "qat",
            spell(c, "--batch-size"),
            "3",
            spell(c, "--top-k"),
            "5",
            spell(c, "--precision"),
            "bf16",
            spell(c, "--precision"),
            "fp32",
        ]
    ).args_[0]
    assert (cfg.batch, cfg.topk, cfg.dtypes) == (3, 5, ("bf16", "fp32"))
    c = "bench cache"
    kw = _call(["bench", "cache", spell(c, "--batch-size"), "3", spell(c, "--top-k"), "5"]).kwargs
    assert (kw["batch"], kw["K"]) == (3, 5)
    c = "bench lut-linear"
    a = _call(
        ["bench", "lut-linear", spell(c, "--out-features"), "48", spell(c, "--in-features"), "16", "--device", "cpu"]
    ).args_
    assert a[:2] == (48, 16)
    c = "bench pretrain"
    call = _call(["bench", "pretrain", spell(c, "--precision"), "bf16", spell(c, "--grad-checkpointing")])
    assert call.args_[6] == "bf16" and call.kwargs["grad_checkpoint"] is True
    cfg = _call(
        ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "r"), spell("train", "--grad-clip"), "0.5"]
    ).args_[0]
    assert cfg.clip == 0.5
    c = "pretrain"
    cfg = _call(
        [
            "pretrain",
            "--data",
            str(tmp_path / "d.npy"),
            spell(c, "--grad-checkpointing"),
            spell(c, "--eval-batches"),
            "7",
        ]
    ).args_[0]
    assert (cfg.grad_checkpoint, cfg.eval_iters, cfg.data) == (True, 7, str(tmp_path / "d.npy"))
    cfg = _call(["pretrain", spell(c, "--no-grad-checkpointing")]).args_[0]
    assert cfg.grad_checkpoint is False
    kw = _call(
        ["data", "prepare", "-s", "x", "-o", str(tmp_path / "t.npy"), spell("data prepare", "--max-tokens"), "2K"]
    ).kwargs
    assert kw["max_tokens"] == 2000


def test_new_short_flags_reach_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lutq.train.trainer

    monkeypatch.setattr(lutq.train.trainer, "train", _stop)
    cfg = _call(["train", "-c", str(tmp_path), "-o", str(tmp_path / "r"), "-m", "M", "-p", "q4a4", "-b", "2"]).args_[0]
    assert (cfg.cache, cfg.out, cfg.model, cfg.preset, cfg.batch_size) == (tmp_path, tmp_path / "r", "M", "q4a4", 2)


@cache
def _docs_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_lutq_doc_commands", Path(__file__).with_name("test_docs_commands.py")
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def hidden_spellings_in(args: tuple[str, ...]) -> list[str]:
    """Old (hidden) option spellings in one documented `lutq ...` invocation."""
    cmd: Any = get_command(app)
    path: list[str] = []
    for tok in args:
        if tok in getattr(cmd, "commands", {}):
            cmd = cmd.commands[tok]
            path.append(tok)
        elif not tok.startswith("-"):
            break
    hidden = {o for p in options(cmd, hidden=True) for o in (*p.opts, *p.secondary_opts)}
    flags = {a.strip("[]").partition("=")[0] for a in args if a.startswith(("-", "[-"))}
    return [f"`{name(tuple(path))}` uses the old spelling {f}" for f in sorted(flags & hidden)]


def test_docs_use_the_current_spellings() -> None:
    docs = _docs_module()
    problems = [f"{u.where}: {p}" for u in docs.doc_uses() for p in hidden_spellings_in(u.args)]
    assert not problems, "\n".join(problems)


def test_hidden_spelling_check_catches_an_old_flag() -> None:
    docs = _docs_module()
    text = "```\nlutq bench qat --shape tiny --batch 8 \\\n  --topk 4\n```\nThen `lutq train --clip 0.5 -c C`.\n"
    problems = [p for u in docs.find_uses(docs.extract_snippets(text)) for p in hidden_spellings_in(u.args)]
    assert problems == [
        "`lutq bench qat` uses the old spelling --batch",
        "`lutq bench qat` uses the old spelling --topk",
        "`lutq train` uses the old spelling --clip",
    ], problems


# ---------------------------------------------------------------------------------------------------- errors

MISSING = [  # required arguments / options left out: a usage error (exit 2)
    ["quantize"],
    ["quantize", "-m", "M"],
    ["snap"],
    ["plot"],
    ["chat"],
    ["export", "CKPT"],
    ["convert", "q4-to-q2", "CKPT"],
    ["convert", "latent-to-frozen"],
    ["eval", "ppl", "-m", "M"],
    ["eval", "kd", "-m", "M"],
    ["eval", "compare"],
    ["data", "prepare", "-o", "x.npy"],
    ["cache", "verify"],
    ["pretrain", "export", "RUN"],
    ["store", "push", "NAME"],
    ["store", "pull"],
    ["pull"],
    ["eval", "ppl", "-m"],  # an option without its value
    ["quantize", "--no-such-flag"],
    ["no-such-command"],
    ["--log-level", "chatty", "assets", "list"],
]


@pytest.mark.parametrize("args", MISSING, ids=" ".join)
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    assert "Error" in res.output


NOPE = "NOPE"  # stands for a path that does not exist (under the test's tmp_path)
BAD = [  # bad values and nonexistent inputs that are refused before any model loads: LutqError (exit 1)
    (["bench", "qat", "--grad-ckpt", "sometimes"], "--grad-ckpt must be off, on or both"),
    (["bench", "pretrain", "--precision", "fp8"], "--precision must be one of"),
    (["bench", "lut-linear", "--dtype", "fp8"], "--dtype must be one of"),
    (["convert", "q4-to-q2", NOPE, "OUT", "--mlp", "4x32"], "--mlp: expected LUT_SIZE,RANK"),
    (["data", "prepare", "-s", "shakespeare", "-o", "x.npy", "--max-tokens", "lots"], "--max-tokens 'lots'"),
    (["pretrain", "export", NOPE, "OUT", "--format", "gguf"], "--format 'gguf'"),
    (["speedrun", "--set", "nonsense", "--dry-run"], "--set 'nonsense'"),
    (["assets", "fetch", "no-such-asset"], "unknown asset"),
    (["train", "--resume", NOPE], "not a training run"),
    (["train", "--config", NOPE], "config file not found"),
    (["pretrain", "--config", NOPE], "config file not found"),
    (["pretrain", "--data", NOPE], "token file not found"),
    (["snap", NOPE], "checkpoint not found"),
    (["cache", "verify", NOPE], "not a KD cache"),
    (["store", "list", "--store", NOPE], "no such directory"),
    (["pull", "cache:x", "--store", NOPE], "no such directory"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_lutq_errors(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing, cwd = tmp_path / "missing", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # OUT, x.npy: relative paths that must not be written
    res = CliRunner().invoke(app, [str(missing / "x") if a == NOPE else a for a in args])
    assert isinstance(res.exception, LutqError), (res.output, res.exception)
    assert message in str(res.exception) and "\n" not in str(res.exception), str(res.exception)
    assert not missing.exists()  # a read-only command does not create what it was asked to read
    assert not list(cwd.iterdir())


def test_eval_ppl_checks_its_texts_before_loading_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lutq.models

    monkeypatch.setattr(lutq.models, "load_model", _stop)
    missing = str(tmp_path / "missing.txt")
    res = CliRunner().invoke(app, ["eval", "ppl", "-m", "M", "-t", missing])
    assert isinstance(res.exception, LutqError) and missing in str(res.exception), res.exception


def test_eval_kd_writes_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lutq.kd
    import lutq.models

    class FakeCache:
        def __init__(self, path: Any) -> None:
            pass

        def check_tokenizer(self, tok: Any, model: Any) -> None:
            pass

        def document_units(self, split: str) -> list[int]:
            return [0, 0, 1]

    def fake_evaluate_kd(*args: Any, per_unit: list[dict[str, float]], **kwargs: Any) -> dict[str, float]:
        per_unit += [{"n": 4, "kd_loss": 4.0, "top1_agreement": 2.0}, {"n": 4, "kd_loss": 8.0, "top1_agreement": 2.0}]
        return {"kd_loss": 1.5, "top1_agreement": 0.5}

    monkeypatch.setattr(lutq.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(lutq.kd, "KDCache", FakeCache)
    monkeypatch.setattr(lutq.kd, "evaluate_kd", fake_evaluate_kd)
    out = tmp_path / "kd.json"
    res = CliRunner().invoke(app, ["eval", "kd", "-m", "M", "-c", str(tmp_path), "-b", "2", "--json", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    kd = json.loads(out.read_text())["kd"]
    assert {k: kd[k] for k in ("kd_loss", "top1_agreement", "unit", "units")} == {
        "kd_loss": 1.5,
        "top1_agreement": 0.5,
        "unit": "document",
        "units": 2,
    }
    low, high = kd["ci"]["kd_loss"]  # units 1.0 and 2.0 per token: the t interval of two units
    assert low < 1.5 < high and kd["ci"]["top1_agreement"] == pytest.approx([0.5, 0.5])


def _lutq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lutq.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_subprocess_errors_are_one_verbatim_line(tmp_path: Path) -> None:
    """Through the real entry point: no traceback, one line however long (stderr is 80 columns when piped), no rich
    markup or emoji codes taken from the message."""
    res = _lutq("assets", "fetch", "[bold]no-such:x:" + "y" * 80)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown asset '[bold]no-such:x:yyy" in lines[0], lines
    res = _lutq("--log-level", "loud", "assets", "list")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--log-level" in res.stderr, res.stderr
    res = _lutq("--log-level", "debug", "--version")  # any case
    assert res.returncode == 0 and res.stdout.startswith("lutq "), res.stderr
    res = _lutq("--log-level", "info", "store", "list", "--store", str(tmp_path / "missing"))
    assert res.returncode == 1 and "no such directory" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "missing").exists()
