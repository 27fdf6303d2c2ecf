"""Docs vs CLI: every `lutq ...` command line in README.md and docs/*.md names real subcommands and options.

The parser reads fenced code blocks (logical lines, joined on a trailing backslash; a line starting with `...`
continues the previous command) and inline code spans (which may wrap over lines). A command starts at a `lutq`
token in command position (first, after `VAR=value` assignments, after `time -v`, ...) or at `lutq` / `lutq.cli`
after `python -m` / `torchrun ... -m [--]`. Each command is then walked through the typer app: subcommands
(`cache verify`, `convert q4-to-q2`, alternatives like `ppl|kd|compare`), long and short options (with their
values, `--set key=value` and `--opt=value` too), optional brackets (`[--tighten N]`), placeholders (`CKPT`,
`...`) and the number of positional arguments. Flags quoted on their own (`--calib C --act-power P`) must exist
on some command. Python names the docs take from lutq (```python imports, dotted `lutq.x.y` references) must
import. Only the CLI's structure and lutq's modules are loaded: no model, no data, well under a second.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from lutq.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_INLINE = re.compile(r"(`+)((?:(?!\1).)+?)\1", re.DOTALL)  # a code span; one closes it with as many backticks
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_ANGLED = re.compile(r"<[^<>\s][^<>]*>")
_TERMINATORS = {";", "&&", "||", "|", "&", ">", ">>", "2>&1", "<"}
_WRAPPERS = {"time", "/usr/bin/time", "-v", "exec", "nohup", "env", "sudo", "then", "do", "!"}
_PLACEHOLDER = re.compile(r"^(\.\.\.|…|[A-Z][A-Z0-9_]*(\.\.\.)?|<[^>]*>|\{[^}]*\}|\$\w+|\$\{\w+\})$")


@dataclass(frozen=True)
class Snippet:
    """One command line or inline code span, with where it came from."""

    where: str
    text: str
    continues: bool = False  # a code line starting with `...`: more arguments for the previous command


@dataclass(frozen=True)
class Use:
    """One `lutq ...` invocation: its arguments after `lutq`."""

    where: str
    args: tuple[str, ...]


def extract_snippets(text: str, name: str = "<doc>") -> list[Snippet]:
    """Logical lines of fenced code blocks, then inline code spans of the prose (with a blank line per fence line
    so that line numbers stay right)."""
    out: list[Snippet] = []
    prose: list[str] = []
    fence: str | None = None
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                prose.append("")
            else:
                prose.append(line)
            continue
        prose.append("")
        if m and m.group(1).startswith(fence) and not m.group(2):
            fence = None
            pending = []
            continue
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        logical = " ".join(part.strip() for part in pending)
        pending = []
        if logical:
            out.append(Snippet(f"{name}:{start}", logical, continues=logical.startswith(("...", "…"))))
    body = "\n".join(prose)
    for m in _INLINE.finditer(body):
        span = m.group(2)
        if "\n\n" in span:  # a stray backtick would pair across paragraphs: not a code span
            continue
        number = body.count("\n", 0, m.start()) + 1
        out.append(Snippet(f"{name}:{number}", span.replace("\n", " ").replace("\\|", "|").strip()))
    return out


def _tokens(text: str) -> list[str]:
    text = text.replace("\\|", "|")
    text = _ANGLED.sub(lambda m: m.group(0).replace(" ", "_"), text)  # `<default L64 cache>`: one placeholder
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a doc snippet: fall back to whitespace, drop a trailing comment
        return re.split(r"\s+#", text, maxsplit=1)[0].replace('"', " ").replace("'", " ").split()


def _is_start(tokens: list[str], i: int) -> bool:
    tok = tokens[i]
    prev = tokens[i - 1] if i else None
    if tok == "lutq.cli" or (tok == "lutq" and prev in ("-m", "--")):
        return prev == "-m" or (prev == "--" and i >= 2 and tokens[i - 2] == "-m")
    if tok != "lutq":
        return False
    if prev is None or prev in _TERMINATORS or prev in _WRAPPERS:
        return True
    return all(_ASSIGNMENT.match(t) for t in tokens[:i])


def find_uses(snippets: list[Snippet]) -> list[Use]:
    """Every `lutq ...` invocation in the snippets, its arguments cut at a shell separator or the next `lutq`."""
    uses: list[Use] = []
    last: Use | None = None
    for snip in snippets:
        tokens = _tokens(snip.text)
        if snip.continues and last is not None and last.where.split(":")[0] == snip.where.split(":")[0]:
            # `...   --more-flags`: the previous command again, with other options
            path = _command_path(last.args)
            uses.append(Use(snip.where, (*path, *_cut(tokens[1:]))))
            continue
        starts = [i for i in range(len(tokens)) if _is_start(tokens, i)]
        for i in starts:
            use = Use(snip.where, tuple(_cut(tokens[i + 1 :])))
            uses.append(use)
            last = use
    return uses


def _cut(tokens: list[str]) -> list[str]:
    out = []
    for tok in tokens:
        if tok in _TERMINATORS or tok in ("lutq", "lutq.cli"):
            break
        if tok.endswith(";"):
            out.append(tok[:-1])
            break
        out.append(tok)
    return out


def _command_path(args: tuple[str, ...]) -> list[str]:
    """The leading subcommand names of a use (for `...` continuation lines)."""
    cmd: Any = root_command()
    path: list[str] = []
    for tok in args:
        commands = getattr(cmd, "commands", None)
        if not commands or tok not in commands:
            break
        cmd = commands[tok]
        path.append(tok)
    return path


@cache
def root_command() -> Any:
    return get_command(app)


def _options(cmd: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"--help": None}
    for p in cmd.params:
        if p.param_type_name == "option":
            for name in (*p.opts, *p.secondary_opts):
                opts[name] = p
    return opts


def _max_positionals(cmd: Any) -> float:
    n = 0.0
    for p in cmd.params:
        if p.param_type_name == "argument":
            n += float("inf") if p.nargs == -1 else p.nargs
    return n


def _takes_value(param: Any) -> bool:
    return param is not None and not param.is_flag and not param.count


def _option_like(tok: str) -> bool:
    return re.match(r"^--?[A-Za-z]", tok) is not None


def _option_alternatives(tok: str) -> list[str]:
    """`--blockwise|--one-shot` and `--thinking/--no-thinking` name two options."""
    return re.split(r"[|/](?=-)", tok)


def _clean(tok: str) -> str:
    """Drop optional-argument brackets: `[--tighten` -> `--tighten`, `N]` -> `N`, `[ck/out]` -> `ck/out`."""
    return tok.strip("[]")


def check_use(
    args: tuple[str, ...] | list[str], cmd: Any | None = None, path: tuple[str, ...] = ("lutq",)
) -> list[str]:
    """Problems with one invocation (empty when every subcommand and option exists)."""
    cmd = root_command() if cmd is None else cmd
    opts = _options(cmd)
    commands = getattr(cmd, "commands", None)
    problems: list[str] = []
    positionals = 0
    name = " ".join(path)
    i = 0
    while i < len(args):
        tok = _clean(args[i])
        i += 1
        if not tok or tok in ("...", "…"):
            continue
        if _option_like(tok):
            for alt in _option_alternatives(tok):
                flag, eq, _ = alt.partition("=") if alt.startswith("--") else (alt, "", "")
                if flag not in opts:
                    problems.append(f"`{name}` has no option {flag}")
                    continue
                if _takes_value(opts[flag]) and not eq:
                    if i < len(args) and _option_like(_clean(args[i])):
                        problems.append(f"`{name} {flag}` needs a value, got {args[i]}")
                    elif i < len(args):
                        i += 1
            continue
        if commands:
            alts = tok.split("|")
            if all(a in commands for a in alts):
                for a in alts:
                    problems += check_use(args[i:], commands[a], (*path, a))
                return problems
            if _PLACEHOLDER.match(tok):
                return problems  # `lutq SUBCOMMAND ...`: nothing more to check
            problems.append(f"`{name}` has no subcommand {tok!r} (has: {', '.join(sorted(commands))})")
            return problems
        positionals += 1
        if positionals > _max_positionals(cmd):
            problems.append(f"`{name}` takes {int(_max_positionals(cmd))} positional argument(s), got extra {tok!r}")
    return problems


def doc_uses() -> list[Use]:
    uses: list[Use] = []
    for path in DOC_FILES:
        uses += find_uses(extract_snippets(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    return uses


def all_options() -> set[str]:
    """Every option name of every lutq command (for flags quoted on their own, like `--hard-top1-weight 0`)."""
    out: set[str] = set()
    stack = [root_command()]
    while stack:
        cmd = stack.pop()
        out |= set(_options(cmd))
        stack += list(getattr(cmd, "commands", {}).values())
    return out


# Flags of other programs that the docs quote on their own (`torchrun` reads `--run` as its `--run-path`).
FOREIGN_FLAGS = {"--run-path"}


def bare_flag_problems(snippets: list[Snippet]) -> list[str]:
    """A snippet that starts with a flag (`--calib C --act-power P`) names no command: each of its flags must
    exist on some lutq command."""
    known = all_options() | FOREIGN_FLAGS
    problems = []
    for snip in snippets:
        tokens = [_clean(t) for t in _tokens(snip.text)]
        if snip.continues or not tokens or not _option_like(tokens[0]):
            continue
        for tok in tokens:
            for alt in _option_alternatives(tok) if _option_like(tok) else ():
                flag = alt.partition("=")[0] if alt.startswith("--") else alt
                if flag not in known and _option_like(flag):
                    problems.append(f"{snip.where}: no lutq command has {flag}  [{snip.text}]")
    return problems


_DOTTED = re.compile(r"(?<![\w/.$-])lutq(?:\.[A-Za-z_]\w*)+(?![\w*])")


def _resolve(dotted: str) -> str | None:
    """None when `lutq.a.b.c` is an importable module plus attributes, else what is missing."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] != "lutq":
                raise  # a missing third-party dependency, not a wrong doc name
            continue
        for i in range(n, len(parts)):
            if not hasattr(obj, parts[i]):
                return f"{'.'.join(parts[:i])} has no {parts[i]!r}"
            obj = getattr(obj, parts[i])
        return None
    return f"no module {parts[0]}"


def python_name_problems(text: str, name: str = "<doc>") -> list[str]:
    """Names the docs take from lutq: `from lutq.x import a` / `lutq.x.a` in ```python blocks, and dotted
    `lutq.x.y` references anywhere (a `lutq.core.atomic_*` wildcard is skipped)."""
    problems = []
    for block in re.finditer(r"^\s*```python\n(.*?)^\s*```", text, re.DOTALL | re.MULTILINE):
        first = text.count("\n", 0, block.start(1)) + 1
        for node in ast.walk(ast.parse(textwrap.dedent(block.group(1)))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lutq":
                for alias in node.names:
                    why = _resolve(f"{node.module}.{alias.name}")
                    if why:
                        problems.append(
                            f"{name}:{first + node.lineno - 1}: from {node.module} import {alias.name}: {why}"
                        )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    why = _resolve(alias.name) if alias.name.split(".")[0] == "lutq" else None
                    if why:
                        problems.append(f"{name}:{first + node.lineno - 1}: import {alias.name}: {why}")
    for m in _DOTTED.finditer(text):
        why = _resolve(m.group(0))
        if why:
            problems.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------------- the docs


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_docs_found() -> None:
    uses = doc_uses()
    assert len(uses) > 50, "the parser found almost no `lutq ...` commands: has it broken?"
    used = {u.args[0] for u in uses if u.args}
    assert {"cache", "quantize", "train", "eval", "export", "pretrain", "bench", "speedrun", "store"} <= used


@pytest.mark.parametrize("path", DOC_FILES, ids=_doc_id)
def test_doc_commands_exist(path: Path) -> None:
    snippets = extract_snippets(path.read_text(encoding="utf-8"), _doc_id(path))
    problems = [f"{u.where}: {p}  [lutq {' '.join(u.args)}]" for u in find_uses(snippets) for p in check_use(u.args)]
    problems += bare_flag_problems(snippets)
    assert not problems, "documented commands or flags that the CLI does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=_doc_id)
def test_doc_python_names_exist(path: Path) -> None:
    problems = python_name_problems(path.read_text(encoding="utf-8"), _doc_id(path))
    assert not problems, "documented lutq names that do not exist:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- the parser


def _problems(text: str) -> list[str]:
    snippets = extract_snippets(text)
    return [p for u in find_uses(snippets) for p in check_use(u.args)] + bare_flag_problems(snippets)


def test_parser_catches_a_bogus_flag_in_a_copy_of_the_docs() -> None:
    """Take a real documented command line, add a flag the CLI lacks to a copy of its doc: the check fails."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        lines = [
            ln
            for ln in text.splitlines()
            if re.match(r"^lutq [a-z][\w-]* .*--[a-z][\w-]* \S+$", ln) and not re.search(r"#|\\$", ln)
        ]
        if lines:
            break
    assert lines, "no documented `lutq SUB ... --flag VALUE` line found"
    assert _problems(text) == []
    sub = lines[0].split()[1]
    bad = text.replace(lines[0], lines[0] + " --no-such-flag 3", 1)
    assert any(f"`lutq {sub}" in p and "has no option --no-such-flag" in p for p in _problems(bad)), _problems(bad)
    continued = text.replace(lines[0], lines[0] + " \\\n    --no-such-flag 3", 1)
    assert any("has no option --no-such-flag" in p for p in _problems(continued))
    bad_inline = text + "\nUse `lutq cache verify DIR --bogus` to check.\n"
    assert any("`lutq cache verify` has no option --bogus" in p for p in _problems(bad_inline))
    bad_bare = text + "\nAdd `--calib C --no-such-flag 2` to it.\n"
    assert any("no lutq command has --no-such-flag" in p for p in _problems(bad_bare))


def test_parser_forms() -> None:
    ok = """
Run `lutq convert q4-to-q2 CKPT OUT [--tighten N] [--calib DIR]` or `lutq eval ppl|kd|compare`, then
`lutq cache verify DIR -n 2` and `lutq store push|pull|list`. `pip install lutq`, `lutq.quant.snap_model`,
`lutq speedrun q4a4 --set q4a4.steps=400 --set=q4a4_init.preset=q4a4_r32` and `lutq pretrain ... --run`;
`--blockwise --recon-steps 100` on its own; `lutq train --init <a q2a4 init> --steps 3`.

```bash
OMP_NUM_THREADS=1 lutq bench qat --shape smollm2-135m \\
    --seq-len 64 --seq-len 128   # a comment --with-a-flag
    ...   --full-kl-weight 1
torchrun --standalone --nproc-per-node 8 -m -- lutq.cli pretrain --data d.npy --run
python -m lutq.cli cache -L 64 -K 64 -n 16 && lutq snap ck/q2 [ck/q2-snapped]
/usr/bin/time -v lutq speedrun --run-dir runs/x
```
"""
    uses = find_uses(extract_snippets(ok))
    assert _problems(ok) == [], _problems(ok)
    args = {u.args for u in uses}
    assert ("bench", "qat", "--full-kl-weight", "1") in args
    assert ("pretrain", "--data", "d.npy", "--run") in args
    assert ("cache", "-L", "64", "-K", "64", "-n", "16") in args
    assert len(uses) == 13

    bad = {
        "`lutq eval perplexity --model M`": "has no subcommand 'perplexity'",
        "`lutq convert q4-to-q2 A B [--calib-seqs 256]`": "has no option --calib-seqs",
        "`lutq bench qat|nope`": "has no subcommand 'qat|nope'",
        "```\nlutq train --cache C \\\n  --bogus 1\n```": "`lutq train` has no option --bogus",
        "```\ntorchrun --nproc_per_node 2 -m lutq.cli train --nope\n```": "`lutq train` has no option --nope",
        "`lutq store pull NAME DEST`": "takes 1 positional argument(s), got extra 'DEST'",
        "`lutq speedrun --set --budget 10`": "needs a value",
        "`lutq cache verify DIR -x 2`": "has no option -x",
        "`--recon-stepz 100`": "no lutq command has --recon-stepz",
        "`--thinking/--no-thinkin`": "no lutq command has --no-thinkin",
        "`lutq quantize -m M -o O --blockwise|--one-shots`": "`lutq quantize` has no option --one-shots",
    }
    for text, expected in bad.items():
        assert any(expected in p for p in _problems(text)), (text, _problems(text))


def test_python_name_check() -> None:
    ok = "```python\nimport lutq\nfrom lutq.quant import snap_model\nlutq.quantize\n```\n`lutq.core.atomic_*`\n"
    assert python_name_problems(ok) == []
    bad = "```python\nfrom lutq.quant import no_such_function\n```\nSee `lutq.kd.no_such_name`.\n"
    problems = python_name_problems(bad)
    assert any("no_such_function" in p for p in problems), problems
    assert any("lutq.kd.no_such_name" in p for p in problems), problems
