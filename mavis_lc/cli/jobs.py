"""``mavis jobs ...``: list, show, watch, retry, reap and cancel training jobs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from mavis_lc.cli.common import (
    console,
    errors,
)
from mavis_lc.cli.train import _progress_bar, _report
from mavis_lc.jobs import cancel, wait
from mavis_lc.registry import JobInfo, Registry

jobs_app = typer.Typer(help="Training jobs: list, show, watch, retry, reap, cancel.", no_args_is_help=True)


@jobs_app.command("list")
def list_jobs(
    objective: Annotated[str | None, typer.Option(help="Only this objective's jobs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status (queued, running, ...).")] = None,
    limit: Annotated[int, typer.Option(help="Most jobs to list, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per job.")] = False,
) -> None:
    """List training jobs, newest first."""
    with errors(), Registry() as registry:
        jobs = registry.list_jobs(objective=objective, status=status, limit=limit)
    if as_json:
        for job in jobs:
            print(_job_json(job))
        return
    table = Table(title="training jobs")
    for column in ("id", "objective", "status", "progress", "attempt", "worker", "created", "error"):
        table.add_column(column)
    for job in jobs:
        table.add_row(
            job.id,
            job.objective,
            job.status,
            _progress_text(job.progress),
            str(job.attempt),
            job.worker or "",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            (job.error or "")[:60],
        )
    console.print(table)


def _progress_text(progress: dict[str, Any]) -> str:
    if not progress.get("stage"):
        return ""
    return (
        f"it {progress.get('iteration', 0)} {progress['stage']} {progress.get('step', 0)}/{progress.get('total', '?')}"
    )


@jobs_app.command("show")
def show_job(job_id: Annotated[str, typer.Argument(help="The job id.")]) -> None:
    """Print one job as JSON: status, config, progress, attempt, worker, error, result version."""
    with errors(), Registry() as registry:
        job = registry.get_job(job_id)
    console.print_json(_job_json(job))


def _job_json(job: JobInfo) -> str:
    return json.dumps({name: getattr(job, name) for name in job.__dataclass_fields__}, default=str)


@jobs_app.command("watch")
def watch_job(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    timeout_s: Annotated[float | None, typer.Option(help="Give up watching after this many seconds.")] = None,
) -> None:
    """Follow a job with a live progress bar until it ends; exit 1 unless it succeeded."""
    with errors():
        with _progress_bar() as bar:
            job = wait(job_id, timeout_s=timeout_s, on_progress=bar.show_job)
        _report(job)


@jobs_app.command("retry")
def retry_job(
    job_id: str,
    worker_queue: Annotated[str | None, typer.Option(help="Queued: the Celery queue (default training).")] = None,
) -> None:
    """Submit a failed or cancelled job again as a new job (same objective and config); prints its id."""
    from mavis_lc.jobs import retry

    with errors():
        new_id = retry(job_id, queue=worker_queue)
    typer.echo(new_id)


@jobs_app.command("reap")
def reap_jobs(
    stale_after_s: Annotated[
        float | None, typer.Option(help="Heartbeat age that counts as lost; default MAVIS_STALE_AFTER_S.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the jobs that would be failed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per job.")] = False,
) -> None:
    """Fail running jobs whose worker is gone (no heartbeat for MAVIS_STALE_AFTER_S seconds)."""
    from mavis_lc.jobs import reap

    with errors():
        jobs = reap(stale_after_s=stale_after_s, dry_run=dry_run)
    if as_json:
        for job in jobs:
            print(_job_json(job))
        return
    verb = "would fail" if dry_run else "failed"
    for job in jobs:
        console.print(f"{verb} job {job.id} ({job.objective}, last heartbeat {job.heartbeat_at})")
    if not jobs:
        console.print("no stale running jobs")


@jobs_app.command("cancel")
def cancel_job(job_id: Annotated[str, typer.Argument(help="The job id.")]) -> None:
    """Cancel a job: a queued one at once, a running one at its next progress report."""
    with errors():
        job = cancel(job_id)
    state = "cancel requested" if job.status == "running" else job.status
    console.print(f"job {job.id}: {state}")
