"""The Celery tasks of the training workers: thin shells over `mavis_lc.runner` (claim, train,
register, finish), which the broker-less in-process runner uses too. See `mavis_lc.runner` for a
job's life; here only what Celery adds: retries of transient faults, the task states (PROGRESS,
FAILURE for a failed job, REVOKED for a cancelled one) and the shard chord.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from mavis_lc.errors import JobError, MavisError
from mavis_lc.registry import Registry
from mavis_lc.runner import (
    CANCEL_POLL_S,
    MAX_RETRIES,
    PROGRESS_INTERVAL_S,
    RETRY_BASE_S,
    RETRY_MAX_S,
    StateReporter,
    claim,
    fail_queued_job,
    is_transient,
    job_workdir,
    merge_shards,
    retry_delay_s,
    run_job,
    sample_shard,
    shard_ranges,
    training_config,
    worker_name,
)
from mavis_lc.service.app import app

__all__ = [
    "CANCEL_POLL_S",
    "MAX_RETRIES",
    "PROGRESS_INTERVAL_S",
    "RETRY_BASE_S",
    "RETRY_MAX_S",
    "JobFailed",
    "StateReporter",
    "claim",
    "fail_job",
    "fail_queued_job",
    "is_transient",
    "job_workdir",
    "merge_shards",
    "retry_delay_s",
    "run_job",
    "sample_rollout_shard",
    "sample_shard",
    "shard_ranges",
    "train_from_shards",
    "train_objective",
    "training_config",
    "worker_name",
]

logger = logging.getLogger(__name__)


def _state_reporter(task: Task) -> StateReporter | None:
    """``task.update_state(state="PROGRESS", meta=...)`` when the task runs in a worker with a result backend."""
    if task.request.id is None or task.request.is_eager:
        return None
    return lambda meta: task.update_state(state="PROGRESS", meta=json.loads(json.dumps(meta)))


class JobFailed(JobError):
    """Raised by a Celery task whose job failed, so that Celery and Flower show FAILURE (the
    job row, already finished as failed, stays the source of truth)."""


def _outcome(task: Task, outcome: dict[str, Any]) -> dict[str, Any]:
    """A task's return for its job's outcome: a failed job raises `JobFailed` (Celery state
    FAILURE); a cancelled one is recorded as REVOKED (result backend and a ``task-revoked``
    event for Flower) and ends the task with `Ignore`, so the worker does not overwrite it."""
    if outcome.get("status") == "failed":
        with Registry() as registry:
            error = registry.get_job(outcome["job_id"]).error
        raise JobFailed(f"job {outcome['job_id']} failed: {error}")
    if outcome.get("status") == "cancelled" and task.request.id is not None and not task.request.is_eager:
        task.send_event("task-revoked", terminated=False, expired=False, signum=None)
        # As Celery records a revoke itself: state REVOKED with a TaskRevokedError as the result.
        task.backend.mark_as_revoked(task.request.id, reason=f"job {outcome['job_id']} cancelled", request=task.request)
        raise Ignore()
    return outcome


def _retry(task: Task, exc: Exception) -> None:
    logger.warning("transient error, retrying %s: %s", task.name, exc)
    raise task.retry(exc=exc, countdown=retry_delay_s(task.request.retries))


@app.task(bind=True, name="mavis.train_objective", max_retries=MAX_RETRIES)
def train_objective(self: Task, job_id: str) -> dict[str, Any]:
    """Run the training job ``job_id`` (`run_job`); transient infrastructure errors are retried."""
    try:
        outcome = run_job(job_id, report_state=_state_reporter(self), worker=worker_name(self.request.hostname))
    except Exception as exc:
        if not is_transient(exc):
            raise
        _retry(self, exc)
        raise  # unreachable: retry raises
    return _outcome(self, outcome)


@app.task(bind=True, name="mavis.sample_rollout_shard", max_retries=MAX_RETRIES)
def sample_rollout_shard(self: Task, job_id: str, first_prompt: int, end_prompt: int) -> dict[str, Any]:
    """Sample one prompt range of the job's iteration-0 rollouts (`sample_shard`)."""
    try:
        return sample_shard(job_id, first_prompt, end_prompt)
    except Exception as exc:
        if not is_transient(exc):
            raise
        _retry(self, exc)
        raise


@app.task(bind=True, name="mavis.train_from_shards", max_retries=MAX_RETRIES)
def train_from_shards(self: Task, shards: list[dict[str, Any]], job_id: str) -> dict[str, Any]:
    """Chord callback: merge the shard rollouts (`merge_shards`), then run the job (`run_job`).
    Shards that cannot be merged fail the job."""
    try:
        try:
            merge_shards(job_id, shards)
        except MavisError as exc:
            outcome = fail_queued_job(job_id, f"rollout shards could not be merged: {type(exc).__name__}: {exc}")
        else:
            outcome = run_job(job_id, report_state=_state_reporter(self), worker=worker_name(self.request.hostname))
    except Exception as exc:
        if not is_transient(exc):
            raise
        _retry(self, exc)
        raise
    return _outcome(self, outcome)


@app.task(name="mavis.fail_job")
def fail_job(job_id: str) -> dict[str, Any]:
    """Error callback of a sharded job's chord: a shard failed, so the job fails."""
    return fail_queued_job(job_id, "a rollout shard failed (see the worker logs)")
