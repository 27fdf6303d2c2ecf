"""`lutq store push|pull|list|alias` and the top-level `lutq pull SHORTCUT...`."""

from __future__ import annotations

import typer

from lutq.core.console import console

store_app = typer.Typer(
    help="Artefact store (any fsspec URL; default $LUTQ_STORE or ~/.cache/lutq/store): push, pull, list, alias.",
    no_args_is_help=True,
)

STORE_OPT = typer.Option(None, "--store", help="Store URL or directory (default: $LUTQ_STORE or LUTQ_HOME/store).")


def _existing(store: str | None) -> str:
    """A store that a read-only command (list, pull) names: a local directory given with --store must exist (the
    Store would otherwise create it, and a typo'd path would list as an empty store)."""
    import os
    from pathlib import Path

    from lutq.core.errors import LutqError

    if store and "://" not in store and not Path(os.path.expanduser(store)).is_dir():
        raise LutqError(
            f"store {store}: no such directory (--store names an existing store; `lutq store push` creates one)"
        )
    return store or ""


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@store_app.command("push")
def push(
    name: str = typer.Argument(..., help="Artefact name, e.g. caches/sharegpt_L64 (letters, digits, ._-/)."),
    path: str = typer.Argument(..., help="Directory or file to pack."),
    codec: str = typer.Option("zst", "--codec", help="zst (smaller) or lz4 (faster)."),
    level: int = typer.Option(None, "--level", help="Compression level (default: zst 3, lz4 0)."),
    alias: str = typer.Option(None, "--alias", help="Also define this shortcut for it, e.g. cache:L64."),
    store: str = STORE_OPT,
) -> None:
    """Pack PATH as NAME.tar.zst (or .tar.lz4) with a checksummed NAME.json manifest."""
    from lutq.store import Store
    from lutq.store.store import check_shortcut

    if alias:
        check_shortcut(alias)  # before a push that may take minutes
    s = Store(store or "")
    m = s.push(name, path, codec=codec, level=level)
    if alias:
        s.alias(alias, name)
    console.print(
        f"pushed {name}: {len(m.files)} file(s), {_size(m.total_bytes)} -> {_size(m.archive_bytes)} "
        f"({m.archive}) to {s.url}" + (f"; shortcut {alias}" if alias else ""),
        markup=False,
        emoji=False,
    )


@store_app.command("pull")
def pull_one(
    name: str = typer.Argument(..., help="Artefact name or shortcut (cache:L64, ckpt:q2_best)."),
    dest: str = typer.Option(
        None, "--dest", help="Where to unpack (default: the shortcut's, else ./BASENAME of NAME)."
    ),
    force: bool = typer.Option(False, "--force", help="Re-download even if DEST already matches."),
    store: str = STORE_OPT,
) -> None:
    """Download, verify checksums, and unpack atomically (an existing DEST survives a failed pull)."""
    from lutq.store import Store

    # no markup / emoji: "ckpt:x: path" would print as "ckpt❌ path", a "[b]" in a path would vanish
    console.print(f"{name}: {Store(_existing(store)).pull(name, dest, force=force)}", markup=False, emoji=False)


@store_app.command("list")
def list_artefacts(store: str = STORE_OPT) -> None:
    """List the store's artefacts and shortcuts."""
    from rich.table import Table

    from lutq.store import Store

    s = Store(_existing(store))
    short: dict[str, list[str]] = {}
    for k, v in s.shortcuts().items():
        short.setdefault(v.name, []).append(k)
    table = Table("name", "kind", "files", "size", "archive", "created", "shortcuts", title=s.url)
    for m in s.list():
        archive = f"{m.archive} ({_size(m.archive_bytes)})"
        table.add_row(
            m.name,
            m.kind,
            str(len(m.files)),
            _size(m.total_bytes),
            archive,
            m.created,
            ", ".join(sorted(short.get(m.name, []))),
        )
    console.print(table)


@store_app.command("alias")
def alias(
    shortcut: str = typer.Argument(None, help="Shortcut, e.g. cache:L64 or ckpt:q2_best (omit to list)."),
    name: str = typer.Argument(None, help="Artefact it names."),
    dest: str = typer.Option(None, "--dest", help="Default destination for `lutq pull SHORTCUT`."),
    remove: bool = typer.Option(False, "--remove", help="Delete the shortcut."),
    store: str = STORE_OPT,
) -> None:
    """Define, remove, or list shortcuts (stored in the store's shortcuts.json, shared by every machine)."""
    from lutq.core.errors import LutqError
    from lutq.store import Store

    s = Store(store or "")
    if shortcut is None:
        for k, v in sorted(s.shortcuts().items()):
            console.print(f"{k} -> {v.name}  (pulls to {v.destination(k)})", markup=False, emoji=False)
        return
    if remove:
        s.alias(shortcut, None)
        console.print(f"removed {shortcut}")
        return
    if name is None:
        raise LutqError("lutq store alias SHORTCUT NAME: NAME is missing (or pass --remove)")
    s.alias(shortcut, name, dest=dest)
    console.print(f"{shortcut} -> {name}")


def pull_many(
    names: list[str] = typer.Argument(..., help="Shortcuts or artefact names, e.g. cache:L64 ckpt:q2_init."),
    force: bool = typer.Option(False, "--force", help="Re-download even if the destination already matches."),
    store: str = STORE_OPT,
) -> None:
    """Set up a machine in one command: pull every named artefact to its default destination."""
    from lutq.store import Store

    s = Store(_existing(store))
    for name in names:
        console.print(f"{name}: {s.pull(name, force=force)}", markup=False, emoji=False)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
    app.command("pull")(pull_many)
