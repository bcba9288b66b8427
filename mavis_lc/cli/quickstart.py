"""``mavis quickstart``: train two objectives, register them, steer a chain between them."""

from __future__ import annotations

from typing import Annotated

import typer

from mavis_lc.cli.common import (
    console,
    errors,
)


def quickstart(
    fast: Annotated[bool, typer.Option(help="A small run for a first look (a few minutes on 2 CPU cores).")] = False,
    retrain: Annotated[bool, typer.Option(help="Train again even if matching heads are registered.")] = False,
    output_dir: Annotated[str, typer.Option(help="Folder for the Pareto plot and the summary JSON.")] = (
        "quickstart-output"
    ),
) -> None:
    """Train two objectives, register them, and steer a LangChain chain between them."""
    from mavis_lc.quickstart import run_quickstart

    with errors():
        run_quickstart(fast=fast, retrain=retrain, output_dir=output_dir, console=console)
