"""The ``mavis`` command line, one module per command group: `generate`, `evaluate`
(``mavis eval``), `quickstart`, `train`, `jobs`, `worker`, `registry`, `db`; `common` holds the
consoles, error handling and exit statuses they share.

Typed errors (`MavisError`) are printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mavis_lc.cli.db import db_app
from mavis_lc.cli.evaluate import eval_command
from mavis_lc.cli.generate import generate
from mavis_lc.cli.jobs import jobs_app
from mavis_lc.cli.quickstart import quickstart
from mavis_lc.cli.registry import registry_app
from mavis_lc.cli.train import train
from mavis_lc.cli.worker import worker

app = typer.Typer(help="Steer a frozen language model toward several objectives at once.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.command()(train)
app.command()(worker)
app.command()(generate)
app.command()(quickstart)
app.command("eval")(eval_command)


def _version(value: bool) -> None:
    if value:
        from mavis_lc import __version__

        typer.echo(f"mavis-lc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Steer a frozen language model toward several objectives at once."""


__all__ = ["app"]
