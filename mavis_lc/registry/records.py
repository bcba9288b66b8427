"""What the registry hands back: plain, frozen records of versions, objectives, presets and
jobs (no database session behind them), and the value checks they share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mavis_lc.errors import (
    ConfigurationError,
    IncompatibleHeadError,
)
from mavis_lc.registry.models import (
    TrainingJob,
    ValueHeadVersion,
)


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp the registry stores is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _json_field(name: str, value: Any) -> dict[str, Any]:
    """``value`` as a plain dict, refused unless it is JSON without NaN or infinity."""
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a mapping, got {type(value).__name__}")
    try:
        return dict(json.loads(json.dumps(dict(value), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{name} must be JSON (no NaN or infinity): {exc}") from None


@dataclass(frozen=True)
class VersionInfo:
    """One registered value-head version, as plain values. ``parents`` are version ids."""

    id: int
    objective: str
    version: int
    status: str
    artifact_uri: str
    sha256: str
    size_bytes: int
    base_model_id: str
    tokenizer_fingerprint: str
    architecture: dict[str, Any] = field(hash=False)
    iteration: int
    training_params: dict[str, Any] = field(hash=False)
    metrics: dict[str, Any] = field(hash=False)
    normalization: dict[str, Any] = field(hash=False)
    training_job_id: str | None
    created_at: datetime
    parents: tuple[int, ...] = ()
    base_weights_fingerprint: str | None = None
    """The base's weights fingerprint the head was trained on; None where it was not recorded."""

    @property
    def spec(self) -> str:
        """The spec that names exactly this version, e.g. ``positivity@3``."""
        return f"{self.objective}@{self.version}"

    def check_compatible(self, tokenizer_fingerprint: str, base_model_id: str | None = None) -> None:
        """Refuse to pair this head with a base model whose tokenizer (or, when given, id) differs.

        Raises:
            IncompatibleHeadError: the fingerprints differ, or ``base_model_id`` is given and differs.
        """
        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise IncompatibleHeadError(
                f"{self.spec} was trained against tokenizer {self.tokenizer_fingerprint[:16]}..., "
                f"the base model's tokenizer is {tokenizer_fingerprint[:16]}..."
            )
        if base_model_id is not None and base_model_id != self.base_model_id:
            raise IncompatibleHeadError(
                f"{self.spec} was trained against base model {self.base_model_id!r}, not {base_model_id!r}"
            )

    @classmethod
    def from_row(cls, row: ValueHeadVersion) -> VersionInfo:
        return cls(
            id=row.id,
            objective=row.objective.name,
            version=row.version,
            status=row.status,
            artifact_uri=row.artifact_uri,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            base_model_id=row.base_model_id,
            tokenizer_fingerprint=row.tokenizer_fingerprint,
            architecture=dict(row.architecture),
            iteration=row.iteration,
            training_params=dict(row.training_params),
            metrics=dict(row.metrics),
            normalization=dict(row.normalization),
            training_job_id=row.training_job_id,
            created_at=_aware(row.created_at) or row.created_at,
            parents=tuple(sorted(parent.id for parent in row.parents)),
            base_weights_fingerprint=row.base_weights_fingerprint,
        )


@dataclass(frozen=True)
class VersionDetail:
    """A version with its aliases and its lineage (parents it was derived from, children derived from it)."""

    version: VersionInfo
    aliases: tuple[str, ...]
    parents: tuple[VersionInfo, ...]
    children: tuple[VersionInfo, ...]


@dataclass(frozen=True)
class ObjectiveInfo:
    """An objective and a summary of its versions. ``aliases`` maps alias -> version number."""

    name: str
    description: str | None
    reward_range: tuple[float, float] | None
    version_count: int
    latest_ready_version: int | None
    aliases: dict[str, int] = field(hash=False)


@dataclass(frozen=True)
class PresetInfo:
    """Named objective weights, and optionally the head spec pinned for some objectives."""

    name: str
    weights: dict[str, float] = field(hash=False)
    pinned_specs: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True)
class JobInfo:
    """A training job row as plain values."""

    id: str
    objective: str
    config: dict[str, Any] = field(hash=False)
    status: str
    progress: dict[str, Any] = field(hash=False)
    attempt: int
    worker: str | None
    heartbeat_at: datetime | None
    error: str | None
    cancel_requested: bool
    result_version_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: TrainingJob) -> JobInfo:
        return cls(
            id=row.id,
            objective=row.objective,
            config=dict(row.config),
            status=row.status,
            progress=dict(row.progress),
            attempt=row.attempt,
            worker=row.worker,
            heartbeat_at=_aware(row.heartbeat_at),
            error=row.error,
            cancel_requested=row.cancel_requested,
            result_version_id=row.result_version_id,
            created_at=_aware(row.created_at) or row.created_at,
            started_at=_aware(row.started_at),
            finished_at=_aware(row.finished_at),
        )
