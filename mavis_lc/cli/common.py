"""What every ``mavis`` command shares: the consoles (progress and messages on stderr, data on
stdout), how typed errors end a command, its exit statuses, and JSON output."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from mavis_lc.errors import MavisError

console = Console()
error_console = Console(stderr=True)

EXIT_FAILED = 3
"""Exit status of ``mavis train`` / ``mavis jobs watch`` when the job failed (1: a bad argument
or another typed error, 2: a usage error)."""
EXIT_CANCELLED = 4
"""... when the job was cancelled."""
EXIT_TIMEOUT = 5
"""... when ``--timeout-s`` passed before the job ended (the job goes on)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C during an in-process run: the job is marked cancelled first."""


UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Database URL; default MAVIS_DATABASE_URL or the local SQLite file."),
]


@contextmanager
def errors() -> Iterator[None]:
    """Typed errors become a one-line message and exit status 1; giving up waiting, `EXIT_TIMEOUT`."""
    try:
        yield
    except TimeoutError as exc:
        error_console.print(f"[red]timed out:[/red] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(EXIT_TIMEOUT) from None
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(1) from None


def plain(value: Any) -> Any:
    """A registry dataclass as JSON-able plain values (datetimes as ISO text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def print_json_lines(items: Any) -> None:
    """One JSON object per line on stdout (data), never through rich."""
    for item in items:
        typer.echo(json.dumps(plain(item), sort_keys=True))


def load_options(dtype: str | None, revision: str | None, attn_implementation: str | None) -> dict[str, Any]:
    """`get_engine` keyword arguments for the base-model loading flags."""
    from mavis_lc.base_model import LoadOptions

    return {"dtype": dtype, "options": LoadOptions.of(revision=revision, attn_implementation=attn_implementation)}
