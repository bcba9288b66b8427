"""Celery workers for mavis-lc training jobs, as run from a checkout of the repository.

`worker.app` and `worker.tasks` re-export `mavis_lc.service.app` and `mavis_lc.service.tasks`,
which the installed package carries (this folder is not installed). Applications submit jobs
through `mavis_lc.jobs`, not by calling tasks directly.
"""
