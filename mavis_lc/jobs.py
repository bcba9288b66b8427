"""Training jobs, as an application uses them: submit, read status and progress, wait, cancel.

    from mavis_lc.jobs import submit_training, wait
    job_id = submit_training("positivity", {"prompts": "prompts.txt", "n_iterations": 2})
    job = wait(job_id, timeout_s=3600)      # JobInfo; job.status == "succeeded"
    job.result_version_id                   # the registered value-head version

With ``MAVIS_BROKER_URL`` set, a job is a ``training_jobs`` row plus a Celery message on the
``training`` queue, and a worker (``mavis worker``) runs it. Without a broker, `submit_training`
runs it here and now, through the same runner code (`mavis_lc.runner.run_job`), and returns when it
has ended. Either way the row records status, progress, errors and the registered version.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from mavis_lc.errors import ConfigurationError, JobError
from mavis_lc.objectives import get_objective
from mavis_lc.registry import JobInfo, Registry, validate_name
from mavis_lc.registry.models import TERMINAL_JOB_STATUSES
from mavis_lc.settings import get_settings
from mavis_lc.training import TrainingConfig, load_prompts

__all__ = ["cancel", "job_status", "submit_training", "wait"]

ProgressReporter = Callable[[dict[str, Any]], None]
"""Receives progress snapshots: ``{"stage", "iteration", "step", "total", "metrics", "heartbeat", ...}``."""


@contextmanager
def _registry(registry: Registry | None) -> Iterator[Registry]:
    if registry is not None:
        yield registry
        return
    with Registry() as owned:
        yield owned


def submit_training(
    objective: str,
    config: TrainingConfig | Mapping[str, Any] | None = None,
    *,
    shards: int = 1,
    in_process: bool | None = None,
    on_progress: ProgressReporter | None = None,
    registry: Registry | None = None,
    queue: str | None = None,
) -> str:
    """Record a training job for ``objective`` and queue it (or, with no broker, run it); returns the job id.

    Args:
        objective: the reward spec (a built-in name, ``hf:<dir>`` or ``package.module:function``);
            it replaces ``config.objective``. The version is registered under the objective's
            name (``objective_options["name"]``, else the built-in or function name).
        config: a `TrainingConfig` or a mapping of its fields; ``prompts`` is required.
        shards: sample iteration-0 rollouts in this many prompt ranges, on as many workers
            (in-process: one after the other). The result is the same for every value.
        in_process: run here even with a broker (True), or refuse to run without one (False);
            default: run here exactly when ``MAVIS_BROKER_URL`` is unset.
        on_progress: in-process only: called with every progress snapshot.
        queue: the Celery queue the job's messages go to (default ``training``), so that only
            workers started with ``mavis worker --queues NAME`` take it (say ``gpu`` for the
            workers on GPU machines). Retries and shards stay on it.

    Raises:
        ConfigurationError: an unknown config field, a value out of range, no prompts, or a bad objective spec.
        JobError: ``in_process=False`` and no broker is configured, or the broker refused the message
            (the job is then marked failed).
    """
    from mavis_lc.runner import TRAINING_QUEUE, merge_shards, run_job, sample_shard, shard_ranges, training_config

    target_queue = _queue_name(queue if queue is not None else TRAINING_QUEUE)
    fields = config.to_dict() if isinstance(config, TrainingConfig) else dict(config or {})
    fields["objective"] = objective
    training = training_config(fields)
    if training.prompts is None:
        raise ConfigurationError("a training job needs prompts: a .jsonl/.txt path or a list of prompts")
    n_prompts = len(load_prompts(training.prompts, training.max_prompts))
    name = validate_name(get_objective(objective, **training.objective_options).name, "objective name")
    broker = get_settings().resolved_broker_url()
    local = in_process if in_process is not None else broker is None
    if not local and broker is None:
        raise JobError("no broker configured: set MAVIS_BROKER_URL, or run the job in-process")
    ranges = shard_ranges(n_prompts, training.rollout_prompts_per_batch, shards)
    if not local:  # before any row exists: a missing [worker] extra leaves nothing half-written
        from mavis_lc.extras import require

        require("celery", "worker", "queuing a job")
        require("redis", "worker", "queuing a job")
    with _registry(registry) as reg:
        job_id = reg.create_job(name, training.to_dict())
        if local:
            if len(ranges) > 1:
                merge_shards(job_id, [sample_shard(job_id, first, end, registry=reg) for first, end in ranges], reg)
            run_job(job_id, report_state=on_progress, registry=reg)
            return job_id
        try:
            _enqueue(job_id, ranges, target_queue)
        except Exception as exc:
            reg.finish_job(job_id, "failed", error=f"could not enqueue: {type(exc).__name__}: {exc}")
            raise JobError(f"could not queue job {job_id} on {broker!r}: {exc}") from exc
    return job_id


_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _queue_name(name: object) -> str:
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"queue must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def _enqueue(job_id: str, ranges: list[tuple[int, int]], queue: str) -> None:
    """Send the job's message(s) by task name to ``queue``, on an app built from the current
    settings; the Celery task id of the training task is the job id. `submit_training` has
    checked that the [worker] extra is installed."""
    from celery import chord

    from mavis_lc.service.app import create_app

    app = create_app()
    try:
        if len(ranges) == 1:
            app.send_task("mavis.train_objective", args=[job_id], task_id=job_id, queue=queue)
            return
        header = [
            app.signature("mavis.sample_rollout_shard", args=(job_id, first, end), immutable=True, queue=queue)
            for first, end in ranges
        ]
        body = app.signature("mavis.train_from_shards", args=(job_id,), task_id=job_id, queue=queue)
        body.on_error(app.signature("mavis.fail_job", args=(job_id,), immutable=True, queue=queue))
        chord(header, app=app)(body)
    finally:
        app.close()


def job_status(job_id: str, *, registry: Registry | None = None) -> JobInfo:
    """The job's row: status, progress (stage, iteration, step, total, metrics, heartbeat),
    attempt, worker, error and ``result_version_id``.

    Raises:
        NotFoundError: no such job.
    """
    with _registry(registry) as reg:
        return reg.get_job(job_id)


def wait(
    job_id: str,
    timeout_s: float | None = None,
    *,
    poll_s: float = 0.5,
    on_progress: Callable[[JobInfo], None] | None = None,
    registry: Registry | None = None,
) -> JobInfo:
    """Block until the job has ended (succeeded, failed or cancelled) and return its row.

    ``on_progress`` is called with the row at every poll. ``timeout_s=None`` waits for ever.

    Raises:
        NotFoundError: no such job.
        TimeoutError: the job has not ended after ``timeout_s`` seconds (it goes on running).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _registry(registry) as reg:
        while True:
            job = reg.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s} s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


def cancel(job_id: str, *, registry: Registry | None = None) -> JobInfo:
    """Cancel a job: a queued one at once (a worker that receives it later does nothing); a
    running one stops cooperatively at its next progress report, registering nothing; a
    finished one is left as it is. Returns the row after the request.

    Raises:
        NotFoundError: no such job.
    """
    with _registry(registry) as reg:
        return reg.request_cancel(job_id)


def retry(job_id: str, *, in_process: bool | None = None, queue: str | None = None) -> str:
    """Submit a failed or cancelled job again, as a new job with the same objective and config;
    returns the new job's id (the old row keeps its history). Arguments as `submit_training`.

    Raises:
        NotFoundError: no such job.
        JobError: the job is queued, running or succeeded (only a failed or cancelled job is retried).
    """
    with _registry(None) as reg:
        job = reg.get_job(job_id)
    if job.status not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {job.status}; only a failed or cancelled job can be retried")
    config = dict(job.config)
    objective = str(config.pop("objective"))
    return submit_training(objective, config, in_process=in_process, queue=queue)


def reap(
    *, stale_after_s: float | None = None, dry_run: bool = False, registry: Registry | None = None
) -> list[JobInfo]:
    """Fail running jobs whose worker is gone: no heartbeat for ``stale_after_s`` seconds
    (default ``MAVIS_STALE_AFTER_S``). A re-delivered message would take such a job over; this is
    for jobs whose message is lost too (a broker that lost its queue). Each job is failed by
    compare-and-set, so a job whose heartbeat comes back meanwhile is left running.

    Returns:
        The jobs failed (with ``dry_run``: the jobs that would be).
    """
    from datetime import timedelta

    from sqlalchemy import select, update

    from mavis_lc.registry.db import session_factory
    from mavis_lc.registry.models import TrainingJob, utcnow
    from mavis_lc.runner import WorkerSettings

    limit = stale_after_s if stale_after_s is not None else WorkerSettings().stale_after_s
    if not limit > 0:
        raise ConfigurationError(f"stale_after_s must be > 0, got {stale_after_s!r}")
    with _registry(registry) as reg:
        cutoff = utcnow() - timedelta(seconds=limit)
        stale = TrainingJob.status == "running", TrainingJob.heartbeat_at < cutoff
        sessions = session_factory(reg.engine)
        with sessions() as session:
            ids = list(session.scalars(select(TrainingJob.id).where(*stale).order_by(TrainingJob.created_at)))
        reaped = []
        for job_id in ids:
            if not dry_run:
                with sessions.begin() as session:
                    done = session.execute(
                        update(TrainingJob)
                        .where(TrainingJob.id == job_id, *stale)
                        .values(
                            status="failed",
                            error=f"reaped: no heartbeat for more than {limit:g} s (worker lost)",
                            finished_at=utcnow(),
                        )
                        .execution_options(synchronize_session=False)
                    ).rowcount  # type: ignore[attr-defined]
                if not done:
                    continue
            reaped.append(reg.get_job(job_id))
    return reaped
