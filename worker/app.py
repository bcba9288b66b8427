"""The Celery app, for ``celery -A worker.app`` from a checkout of the repository. The app itself
is `mavis_lc.service.app` (installed with the package: ``mavis worker`` runs it)."""

from mavis_lc.service.app import TASK_NAMES, TRAINING_QUEUE, WorkerSettings, app, celery_config, create_app

__all__ = ["TASK_NAMES", "TRAINING_QUEUE", "WorkerSettings", "app", "celery_config", "create_app"]
