"""Celery workers for mavis-lc training jobs: thin shells over `mavis_lc.training`.

`worker.app` holds the Celery app and its settings; `worker.tasks` the tasks. Applications
submit jobs through `mavis_lc.jobs`, not by calling tasks directly.
"""
