"""``mavis train``: train an objective, queued or in this process.

``train`` has one flag per `TrainingConfig` field (its help text is the field's). With
``MAVIS_BROKER_URL`` set it queues the job (``--wait`` follows it with a progress bar);
without, it runs the job in this process with a progress bar. Typed errors are printed as
one line on stderr with exit status 1; a job that ends failed or cancelled exits with 1.
"""

from __future__ import annotations

import inspect
import json
import time
import typing
from dataclasses import MISSING, fields, replace
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mavis_lc.cli.common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    console,
    error_console,
    errors,
)
from mavis_lc.errors import ConfigurationError
from mavis_lc.jobs import submit_training, wait
from mavis_lc.registry import JobInfo, Registry
from mavis_lc.settings import get_settings
from mavis_lc.training import TrainingConfig, load_prompts
from mavis_lc.training.estimate import estimate_rollouts
from mavis_lc.training.prompts import format_prompts
from mavis_lc.training.run import rollout_cache_path

# Fields typed as a dict or a list of prompts become one JSON / path option.
_OPTION_TYPES: dict[str, Any] = {"objective_options": str | None, "prompts": str | None}


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
    with errors():
        _train(objective, **options)


train.__signature__ = _train_signature()  # type: ignore[attr-defined]
