"""``mavis train``, ``mavis jobs ...`` and ``mavis worker``: training jobs from the command line.

``train`` has one flag per `TrainingConfig` field (its help text is the field's). With
``MAVIS_BROKER_URL`` set it queues the job (``--wait`` follows it with a progress bar);
without, it runs the job in this process with a progress bar. Typed errors are printed as
one line on stderr with exit status 1; a job that ends failed or cancelled exits with 1.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields, replace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from mavis_lc.errors import ConfigurationError, MavisError
from mavis_lc.jobs import cancel, submit_training, wait
from mavis_lc.registry import JobInfo, Registry
from mavis_lc.settings import get_settings
from mavis_lc.training import TrainingConfig, load_prompts
from mavis_lc.training.estimate import estimate_rollouts
from mavis_lc.training.prompts import format_prompts
from mavis_lc.training.run import rollout_cache_path

jobs_app = typer.Typer(help="Training jobs: list, show, watch, cancel.", no_args_is_help=True)

console = Console()
error_console = Console(stderr=True)

# Fields typed as a dict or a list of prompts become one JSON / path option.
_OPTION_TYPES: dict[str, Any] = {"objective_options": str | None, "prompts": str | None}


@contextmanager
def _errors() -> Iterator[None]:
    """Typed errors become a one-line message and exit status 1; giving up waiting, `EXIT_TIMEOUT`."""
    try:
        yield
    except TimeoutError as exc:
        error_console.print(f"[red]timed out:[/red] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(EXIT_TIMEOUT) from None
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(1) from None


class _ProgressBar:
    """A rich progress bar over a job's stages: one line per (stage, iteration)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str, int], TaskID] = {}

    def show(self, snapshot: dict[str, Any]) -> None:
        """Advance the bar of the snapshot's stage and iteration (``{"stage", "iteration", "step", "total"}``)."""
        if not snapshot.get("stage"):
            return
        key = (str(snapshot["stage"]), int(snapshot.get("iteration", 0)))
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"iteration {key[1]}: {key[0]}", total=None)
        update: dict[str, Any] = {"completed": snapshot.get("step", 0), "total": snapshot.get("total") or None}
        metrics = snapshot.get("metrics") or {}
        if key[0] == "rollouts" and "planned_tokens" in metrics:
            update["description"] = f"iteration {key[1]}: rollouts ({_rollout_pace(metrics)})"
        if key[0] == "fit" and "within_prompt_r2" in metrics:  # the within-state fit of the last epoch
            update["description"] = (
                f"iteration {key[1]}: fit (within-prompt R² {metrics['within_prompt_r2']:.3f}, "
                f"sibling corr {metrics.get('sibling_corr', float('nan')):.3f})"
            )
        self.progress.update(self.tasks[key], **update)

    def show_job(self, job: JobInfo) -> None:
        self.show(job.progress)
        self.progress.update(self.status, description=f"job {job.id[:8]} {job.objective}: {job.status}")

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        self.status = self.progress.add_task("", total=None, visible=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)


def _rollout_pace(metrics: dict[str, Any]) -> str:
    """``at most 44,000 tokens, 180 tok/s, at most 3.9 min left``: the plan, the pace and what it implies."""
    planned, tokens, rate = metrics["planned_tokens"], metrics.get("tokens", 0), metrics.get("tokens_per_s", 0.0)
    text = f"at most {int(planned):,} tokens"
    if rate > 0:
        text += f", {rate:.0f} tok/s, at most {max(planned - tokens, 0) / rate / 60:.1f} min left"
    return text


def _progress_bar() -> _ProgressBar:
    return _ProgressBar(
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=error_console,
            transient=False,
        )
    )


def _print_estimate(config: TrainingConfig, budget_minutes: float | None) -> None:
    """Print the run's planned rollout tokens and calibrated time; refuse one over the budget.

    Iteration-0 rollouts already in the shared cache (another objective sampled them) cost nothing.

    Raises:
        ConfigurationError: the estimate exceeds ``budget_minutes``.
    """
    config.validate()
    if config.prompts is None:
        return  # submit_training names the missing prompts
    base = config.load_base()
    prompts = format_prompts(base.tokenizer, load_prompts(config.prompts, config.max_prompts), config.chat_template)
    estimate = estimate_rollouts(base, prompts, config)
    if rollout_cache_path(config, base, prompts).is_file():
        estimate = replace(estimate, planned_tokens_per_iteration=[0, *estimate.planned_tokens_per_iteration[1:]])
        console.print("iteration-0 rollouts: reusing the shared cache")
    console.print(estimate.describe())
    if budget_minutes is not None and estimate.seconds > budget_minutes * 60:
        raise ConfigurationError(
            f"this recipe needs about {estimate.seconds / 60:.1f} min of rollouts on this machine, over "
            f"--budget-minutes {budget_minutes:g}: use fewer --max-prompts, a smaller --expand-top-m or --k-root, "
            f"or a shorter --leaf-completion-tokens"
        )


EXIT_FAILED = 3
"""Exit status of ``mavis train`` / ``mavis jobs watch`` when the job failed (1: a bad argument
or another typed error, 2: a usage error)."""
EXIT_CANCELLED = 4
"""... when the job was cancelled."""
EXIT_TIMEOUT = 5
"""... when ``--timeout-s`` passed before the job ended (the job goes on)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C during an in-process run: the job is marked cancelled first."""


def _report(job: JobInfo) -> None:
    """Print how the job ended; exit `EXIT_FAILED` or `EXIT_CANCELLED` unless it succeeded."""
    if job.status == "succeeded":
        version = ""
        if job.result_version_id is not None:
            with Registry() as registry:
                version = next(
                    (v.spec for v in registry.list_versions(job.objective) if v.id == job.result_version_id), ""
                )
        console.print(f"job {job.id} succeeded: registered {version or job.result_version_id}")
        return
    error_console.print(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""), markup=False)
    raise typer.Exit(EXIT_CANCELLED if job.status == "cancelled" else EXIT_FAILED)


def _train(
    objective: str,
    *,
    shards: int,
    queue: bool | None,
    wait_for_it: bool,
    timeout_s: float | None,
    budget_minutes: float | None = None,
    worker_queue: str | None = None,
    **options: Any,
) -> None:
    """Body of ``mavis train``; ``options`` are `TrainingConfig` fields as the flags gave them
    (None for a flag not given: the field keeps its default)."""
    config = {name: value for name, value in options.items() if value is not None}
    if isinstance(config.get("objective_options"), str):
        try:
            config["objective_options"] = json.loads(config["objective_options"])
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"--objective-options must be a JSON object: {exc}") from None
    in_process = None if queue is None else not queue
    local = in_process if in_process is not None else get_settings().resolved_broker_url() is None
    if local:
        started = time.perf_counter()
        _print_estimate(TrainingConfig(objective=objective, **config), budget_minutes)
        try:
            with _progress_bar() as bar:
                job_id = submit_training(objective, config, shards=shards, in_process=True, on_progress=bar.show)
        except KeyboardInterrupt:
            error_console.print("interrupted: the job is marked cancelled (mavis jobs list)")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        _report(wait(job_id, timeout_s=0))
        console.print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min")
        return
    job_id = submit_training(objective, config, shards=shards, in_process=False, queue=worker_queue)
    console.print(job_id)
    if wait_for_it:
        with _progress_bar() as bar:
            job = wait(job_id, timeout_s=timeout_s, on_progress=bar.show_job)
        _report(job)


def _train_signature() -> inspect.Signature:
    """``mavis train``'s parameters: OBJECTIVE, one option per `TrainingConfig` field, and the job options."""
    hints = typing.get_type_hints(TrainingConfig)
    parameters = [
        inspect.Parameter(
            "objective",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                str, typer.Argument(help="Objective: a built-in name, hf:<dir> or package.module:function.")
            ],
        )
    ]
    for spec in fields(TrainingConfig):
        if spec.name == "objective":
            continue
        kind = _OPTION_TYPES.get(spec.name, hints[spec.name])
        default = None if spec.default is MISSING else spec.default
        help_text = spec.metadata.get("help", "")
        if spec.name == "objective_options":
            help_text += " JSON object."
        parameters.append(
            inspect.Parameter(
                spec.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[kind, typer.Option(help=help_text)],
                default=default,
            )
        )
    job_options: list[tuple[str, Any, Any]] = [
        ("shards", Annotated[int, typer.Option(help="Sample iteration-0 rollouts in this many prompt ranges.")], 1),
        (
            "queue",
            Annotated[
                bool | None,
                typer.Option(
                    "--queue/--in-process", help="Queue for a worker, or run here; default: queue iff a broker is set."
                ),
            ],
            None,
        ),
        (
            "wait_for_it",
            Annotated[bool, typer.Option("--wait", help="Queued: follow the job with a progress bar.")],
            False,
        ),
        (
            "timeout_s",
            Annotated[float | None, typer.Option(help="With --wait: give up waiting after this many seconds.")],
            None,
        ),
        (
            "budget_minutes",
            Annotated[
                float | None,
                typer.Option(
                    help="In-process: refuse to start when the calibrated rollout time exceeds this many minutes."
                ),
            ],
            None,
        ),
    ]
    job_options.append(
        (
            "worker_queue",
            Annotated[
                str | None,
                typer.Option(help="Queued: the Celery queue (default training), e.g. gpu for `mavis worker -Q gpu`."),
            ],
            None,
        )
    )
    for name, annotation, default in job_options:
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        )
    return inspect.Signature(parameters)


def train(objective: str, **options: Any) -> None:
    """Train OBJECTIVE's value model: queue a job for a worker, or run it here when no broker is set."""
    with _errors():
        _train(objective, **options)


train.__signature__ = _train_signature()  # type: ignore[attr-defined]


@jobs_app.command("list")
def list_jobs(
    objective: Annotated[str | None, typer.Option(help="Only this objective's jobs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status (queued, running, ...).")] = None,
    limit: Annotated[int, typer.Option(help="Most jobs to list, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per job.")] = False,
) -> None:
    """List training jobs, newest first."""
    with _errors(), Registry() as registry:
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
    with _errors(), Registry() as registry:
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
    with _errors():
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

    with _errors():
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

    with _errors():
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
    with _errors():
        job = cancel(job_id)
    state = "cancel requested" if job.status == "running" else job.status
    console.print(f"job {job.id}: {state}")


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

    with _errors():
        if get_settings().resolved_broker_url() is None:
            raise ConfigurationError("mavis worker needs MAVIS_BROKER_URL (e.g. redis://localhost:6379/0)")
        from mavis_lc.extras import require

        require("celery", "worker", "mavis worker")
        require("redis", "worker", "mavis worker")
        WorkerSettings().check()
    command = worker_command(concurrency, loglevel, hostname, queues)
    os.execv(command[0], command)
