"""``mavis worker``: a Celery training worker on ``MAVIS_BROKER_URL``."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mavis_lc.cli.common import (
    errors,
)
from mavis_lc.errors import ConfigurationError
from mavis_lc.settings import get_settings


def worker_command(concurrency: int, loglevel: str, hostname: str | None, queues: str) -> list[str]:
    """The ``celery worker`` command line ``mavis worker`` runs."""
    command = [
        sys.executable, "-m", "celery", "-A", "mavis_lc.service.app", "worker",
        "-Q", queues, "-c", str(concurrency), "--prefetch-multiplier", "1", "--max-tasks-per-child", "1",
        "-O", "fair", "-E", "--loglevel", loglevel,
    ]  # fmt: skip
    if hostname:
        command += ["--hostname", hostname]
    return command


def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Jobs at once (one per process).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    hostname: Annotated[str | None, typer.Option(help="Worker node name (default celery@<host>).")] = None,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume.")] = "training",
) -> None:
    """Start a Celery training worker on MAVIS_BROKER_URL (-Q training -c 1, prefetch 1, one job per process)."""
    from mavis_lc.runner import WorkerSettings

    with errors():
        if get_settings().resolved_broker_url() is None:
            raise ConfigurationError("mavis worker needs MAVIS_BROKER_URL (e.g. redis://localhost:6379/0)")
        from mavis_lc.extras import require

        require("celery", "worker", "mavis worker")
        require("redis", "worker", "mavis worker")
        WorkerSettings().check()
    command = worker_command(concurrency, loglevel, hostname, queues)
    os.execv(command[0], command)
