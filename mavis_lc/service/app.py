"""The Celery app of the training workers, configured from ``MAVIS_*`` settings (docs/operations.md).

    celery -A mavis_lc.service.app worker -Q training -c 1 --prefetch-multiplier 1   # or: mavis worker

Why each production setting:

- ``task_acks_late``: a message is acknowledged when the job ends, so a worker that dies
  mid-job leaves it to be delivered again (the job row's claim makes duplicates harmless).
- Redis re-delivers an unacknowledged message after ``visibility_timeout_s``; a job that runs
  longer would be handed to a second worker while the first still runs it. So
  ``visibility_timeout_s > time_limit_s > soft_time_limit_s``: the hard limit kills a runaway
  job before the broker re-delivers it, and the soft limit fires first, leaving
  ``time_limit_s - soft_time_limit_s`` to stop at a stage boundary (stages checkpoint as they end).
- ``worker_prefetch_multiplier=1`` with ``-c 1``: a busy worker holds no second job that an idle
  worker could run. ``worker_max_tasks_per_child=1``: every job starts in a fresh process, so
  model memory is returned and CUDA is first initialised in that child, never in the parent.
- ``task_track_started``: a delivered job shows STARTED (then PROGRESS) in the result backend.
- JSON only, and task arguments are job ids: the job's configuration lives in its database row.

This module imports neither torch nor the training code: the worker's parent process stays small.
"""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery

from mavis_lc.errors import ConfigurationError
from mavis_lc.runner import TRAINING_QUEUE, WorkerSettings
from mavis_lc.settings import get_settings

__all__ = ["TASK_NAMES", "TRAINING_QUEUE", "WorkerSettings", "app", "celery_config", "create_app"]

TASK_NAMES = ("mavis.train_objective", "mavis.sample_rollout_shard", "mavis.train_from_shards", "mavis.fail_job")


def celery_config(settings: WorkerSettings, broker_url: str | None, result_backend: str | None) -> dict[str, Any]:
    """The Celery configuration (``app.conf``) the workers and the submitting side share."""
    # kombu sweeps for expired unacknowledged messages every interval * throttle seconds
    # (100 s by default); sweep every interval, so a lost job is re-delivered soon after
    # its visibility timeout.
    restore_interval_s = max(1, min(10, settings.visibility_timeout_s // 2))
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": restore_interval_s,
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": broker_url or "memory://",
        "result_backend": result_backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.time_limit_s,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": TRAINING_QUEUE,
        "task_routes": {name: {"queue": TRAINING_QUEUE} for name in TASK_NAMES},
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_concurrency": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
    }


def create_app(
    broker_url: str | None = None,
    result_backend: str | None = None,
    settings: WorkerSettings | None = None,
) -> Celery:
    """A Celery app for ``broker_url`` (default ``MAVIS_BROKER_URL``; none: an in-memory
    broker, enough to import the tasks) and ``result_backend`` (default ``MAVIS_RESULT_BACKEND``,
    else the broker). Timeouts that break the ordering `WorkerSettings.check` wants only warn
    here (tests shorten them on purpose); ``mavis worker`` refuses them."""
    mavis = get_settings()
    worker_settings = settings if settings is not None else WorkerSettings()
    try:
        worker_settings.check()
    except ConfigurationError as exc:
        warnings.warn(f"unsafe worker timeouts: {exc}", RuntimeWarning, stacklevel=2)
    app = Celery("mavis", include=["mavis_lc.service.tasks"])
    app.conf.update(
        celery_config(
            worker_settings,
            broker_url or mavis.resolved_broker_url(),
            result_backend or mavis.resolved_result_backend(),
        )
    )
    return app


app = create_app()
"""The app ``celery -A mavis_lc.service.app`` and ``mavis worker`` run."""
