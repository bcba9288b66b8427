"""The training tasks, for a checkout of the repository: see `mavis_lc.service.tasks` (the tasks)
and `mavis_lc.runner` (a job's life, shared with the in-process runner)."""

from mavis_lc.service.tasks import *  # noqa: F403
from mavis_lc.service.tasks import __all__  # noqa: F401
