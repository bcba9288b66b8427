"""The training-job table: jobs created, claimed, leased, advanced, cancelled and finished by
workers and the in-process runner (`mavis_lc.runner` holds the life of a job)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mavis_lc.errors import (
    ConfigurationError,
    JobError,
    NotFoundError,
)
from mavis_lc.registry.base import RegistryBase
from mavis_lc.registry.models import (
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    TrainingJob,
    ValueHeadVersion,
    utcnow,
)
from mavis_lc.registry.records import (
    JobInfo,
    _json_field,
)
from mavis_lc.registry.specs import validate_name


class JobsMixin(RegistryBase):
    """Training jobs of a `Registry`."""

    def create_job(self, objective: str, config: Mapping[str, Any]) -> str:
        """Record a queued training job for ``objective``; returns its id (a uuid4 string).

        Raises:
            SpecError: ``objective`` is not a valid name.
            ConfigurationError: ``config`` is not JSON.
        """
        job_id = str(uuid.uuid4())
        row = TrainingJob(
            id=job_id,
            objective=validate_name(objective, "objective name"),
            config=_json_field("config", config),
            status="queued",
            progress={},
            attempt=0,
            cancel_requested=False,
        )
        with self._sessions.begin() as session:
            session.add(row)
        return job_id

    def get_job(self, job_id: str) -> JobInfo:
        """The job ``job_id``.

        Raises:
            NotFoundError: no such job.
        """
        with self._sessions() as session:
            return JobInfo.from_row(self._job_row(session, job_id))

    def list_jobs(self, objective: str | None = None, status: str | None = None, limit: int = 100) -> list[JobInfo]:
        """Jobs, newest first, optionally only those of ``objective`` and/or in ``status``."""
        if status is not None and status not in JOB_STATUSES:
            raise ConfigurationError(f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        query = select(TrainingJob).order_by(TrainingJob.created_at.desc(), TrainingJob.id).limit(limit)
        if objective is not None:
            query = query.where(TrainingJob.objective == objective.strip().lower())
        if status is not None:
            query = query.where(TrainingJob.status == status)
        with self._sessions() as session:
            return [JobInfo.from_row(row) for row in session.scalars(query)]

    def claim_job(self, job_id: str, worker: str) -> bool:
        """Move a queued job to running for ``worker``, atomically; ``False`` if it was not
        queued (another worker has it, it finished, or it was cancelled). Increments ``attempt``.

        Raises:
            NotFoundError: no such job.
        """
        now = utcnow()
        with self._sessions.begin() as session:
            claimed = session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
                .values(
                    status="running",
                    worker=worker,
                    attempt=TrainingJob.attempt + 1,
                    started_at=now,
                    heartbeat_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if claimed == 0:
                self._job_row(session, job_id)
        return bool(claimed)

    def update_progress(self, job_id: str, progress: Mapping[str, Any]) -> bool:
        """Replace a running job's progress and refresh its heartbeat. Returns whether
        cancellation was requested, so a worker can stop cooperatively.

        Raises:
            NotFoundError: no such job.
            JobError: the job is not running.
        """
        clean = _json_field("progress", progress)
        with self._sessions.begin() as session:
            row = self._job_row(session, job_id)
            if row.status != "running":
                raise JobError(f"job {job_id} is {row.status}; only a running job reports progress")
            row.progress = clean
            row.heartbeat_at = utcnow()
            return row.cancel_requested

    def request_cancel(self, job_id: str) -> JobInfo:
        """Ask for a job to stop: a queued job is cancelled at once; a running job gets
        ``cancel_requested`` and stops at its next progress report; a finished job is unchanged.

        Raises:
            NotFoundError: no such job.
        """
        with self._sessions.begin() as session:
            row = self._job_row(session, job_id)
            if row.status == "queued":
                row.status, row.finished_at, row.cancel_requested = "cancelled", utcnow(), True
            elif row.status == "running":
                row.cancel_requested = True
            session.flush()
            return JobInfo.from_row(row)

    def finish_job(
        self,
        job_id: str,
        status: str,
        error: str | None = None,
        result_version_id: int | None = None,
    ) -> JobInfo:
        """Record how a queued or running job ended: ``succeeded``, ``failed`` or ``cancelled``.

        Raises:
            NotFoundError: no such job, or no such result version.
            JobError: ``status`` is not a final status, or the job already finished.
        """
        if status not in TERMINAL_JOB_STATUSES:
            raise JobError(f"a job finishes as {', '.join(TERMINAL_JOB_STATUSES)}, not {status!r}")
        with self._sessions.begin() as session:
            row = self._job_row(session, job_id)
            if row.status in TERMINAL_JOB_STATUSES:
                raise JobError(f"job {job_id} already finished as {row.status}")
            if result_version_id is not None and session.get(ValueHeadVersion, result_version_id) is None:
                raise NotFoundError(f"result version id {result_version_id} does not exist")
            row.status, row.error, row.result_version_id = status, error, result_version_id
            row.finished_at = utcnow()
            session.flush()
            return JobInfo.from_row(row)

    @staticmethod
    def _job_row(session: Session, job_id: str) -> TrainingJob:
        row = session.get(TrainingJob, job_id)
        if row is None:
            raise NotFoundError(f"no training job {job_id!r}")
        return row
