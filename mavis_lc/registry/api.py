"""The registry: which value heads exist, how to pick one, and where its bytes are.

``Registry`` is the one entry point. It registers versions (artifact + metadata + lineage in
one transaction), resolves head specs, moves aliases, archives versions, keeps weight
presets, and records training jobs for the workers. Every method opens and closes its own
transaction; instances are cheap to share within a process.
"""

from __future__ import annotations

from mavis_lc.registry.jobs import JobsMixin
from mavis_lc.registry.presets import PresetsMixin
from mavis_lc.registry.records import JobInfo, ObjectiveInfo, PresetInfo, VersionDetail, VersionInfo

__all__ = ["JobInfo", "ObjectiveInfo", "PresetInfo", "Registry", "VersionDetail", "VersionInfo"]


class Registry(PresetsMixin, JobsMixin):
    """Value-head versions, aliases, presets and training jobs in one database + artifact store.

    The concerns live in their own modules: `mavis_lc.registry.base` (connection, objectives),
    `versions` (versions, aliases), `presets` and `jobs` (the training-job table).
    """
