"""``mavis db ...``: create, migrate and check the registry schema (``MAVIS_DATABASE_URL``)."""

from __future__ import annotations

import typer

from mavis_lc.cli.common import (
    UrlOption,
    console,
    error_console,
    errors,
)
from mavis_lc.registry import db as registry_db

db_app = typer.Typer(help="The registry database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(url: UrlOption = None, revision: str = "head") -> None:
    """Create or migrate the registry tables."""
    with errors():
        registry_db.upgrade(url, revision)
    console.print(f"registry database at revision {registry_db.head_revision()}")


@db_app.command("check")
def db_check(url: UrlOption = None) -> None:
    """Exit 1 if the database is behind the migrations or differs from the models."""
    with errors():
        differences = registry_db.check(url)
    if differences:
        for line in differences:
            error_console.print(line, highlight=False, markup=False)
        raise typer.Exit(1)
    console.print("no differences between the database and the models")
