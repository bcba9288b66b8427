"""The registry of value-head versions: which heads exist, how to name one, where its bytes are.

    from mavis_lc.registry import Registry
    registry = Registry()                      # MAVIS_DATABASE_URL, MAVIS_ARTIFACTS
    info = registry.resolve("positivity@production")
    path = registry.fetch_artifact(info)       # a verified local .safetensors file

Specs: ``objective`` (newest ready), ``objective@latest``, ``objective@3``, ``objective@alias``.
"""

from mavis_lc.registry.api import (
    JobInfo,
    ObjectiveInfo,
    PresetInfo,
    Registry,
    VersionDetail,
    VersionInfo,
)
from mavis_lc.registry.db import check, create_registry_engine, upgrade
from mavis_lc.registry.specs import HeadSpec, parse_spec, validate_alias, validate_name
from mavis_lc.registry.store import ArtifactStore, StoredArtifact

__all__ = [
    "ArtifactStore",
    "HeadSpec",
    "JobInfo",
    "ObjectiveInfo",
    "PresetInfo",
    "Registry",
    "StoredArtifact",
    "VersionDetail",
    "VersionInfo",
    "check",
    "create_registry_engine",
    "parse_spec",
    "upgrade",
    "validate_alias",
    "validate_name",
]
