"""The registry: which value heads exist, how to pick one, and where its bytes are.

``Registry`` is the one entry point. It registers versions (artifact + metadata + lineage in
one transaction), resolves head specs, moves aliases, archives versions, keeps weight
presets, and records training jobs for the workers. Every method opens and closes its own
transaction; instances are cheap to share within a process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from mavis_lc.errors import (
    ConfigurationError,
    IncompatibleHeadError,
    JobError,
    NotFoundError,
    RegistryError,
)
from mavis_lc.registry.db import create_registry_engine, resolve_url, session_factory, upgrade
from mavis_lc.registry.models import (
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    VERSION_STATUSES,
    Alias,
    Objective,
    Preset,
    TrainingJob,
    ValueHeadVersion,
    utcnow,
)
from mavis_lc.registry.specs import LATEST, HeadSpec, parse_spec, validate_alias, validate_name
from mavis_lc.registry.store import ArtifactSource, ArtifactStore
from mavis_lc.weights import validate_weights

REGISTER_ATTEMPTS = 5
"""How often a registration that lost a race (unique constraint) is retried."""

LOADABLE_STATUSES = ("ready", "archived")


class _AlreadyRegistered(Exception):
    """Raised inside the registration transaction to roll it back: the job already has a version."""


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


class Registry:
    """Value-head versions, aliases, presets and training jobs in one database + artifact store."""

    def __init__(
        self,
        database_url: str | None = None,
        store: ArtifactStore | None = None,
        *,
        auto_upgrade: bool | None = None,
    ) -> None:
        """Connect to ``database_url`` (default ``MAVIS_DATABASE_URL`` or the embedded SQLite file)
        and ``store`` (default ``MAVIS_ARTIFACTS``).

        ``auto_upgrade`` migrates the database to the newest schema first; by default it does
        so for SQLite (the embedded, single-user case) and not for shared databases, which are
        migrated once with ``mavis db upgrade``.
        """
        self.database_url = resolve_url(database_url)
        self.engine = create_registry_engine(self.database_url)
        self.store = store if store is not None else ArtifactStore()
        self._sessions = session_factory(self.engine)
        if auto_upgrade if auto_upgrade is not None else self.engine.dialect.name == "sqlite":
            upgrade(self.engine)

    def __repr__(self) -> str:
        return f"Registry({self.engine.url.render_as_string(hide_password=True)!r}, {self.store!r})"

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # Objectives -------------------------------------------------------------------------

    def ensure_objective(
        self,
        name: str,
        description: str | None = None,
        reward_range: tuple[float, float] | None = None,
    ) -> ObjectiveInfo:
        """Create the objective ``name`` if it does not exist; update description and reward
        range when given. Returns the objective.

        Raises:
            SpecError: ``name`` is not a valid objective name.
            ConfigurationError: ``reward_range`` is not (low, high) with low <= high.
        """
        name = validate_name(name, "objective name")
        if reward_range is not None:
            low, high = (float(bound) for bound in reward_range)
            if not low <= high:
                raise ConfigurationError(f"reward_range must be (low, high) with low <= high, got {reward_range}")
        for _ in range(REGISTER_ATTEMPTS):
            try:
                with self._sessions.begin() as session:
                    row = session.scalar(select(Objective).where(Objective.name == name))
                    if row is None:
                        row = Objective(name=name, last_version=0)
                        session.add(row)
                    if description is not None:
                        row.description = description
                    if reward_range is not None:
                        row.reward_min, row.reward_max = low, high
                break
            except IntegrityError:  # created concurrently: update the winner's row
                continue
        return self._objective_info(name)

    def list_objectives(self) -> list[ObjectiveInfo]:
        """Every objective, by name."""
        with self._sessions() as session:
            names = session.scalars(select(Objective.name).order_by(Objective.name)).all()
        return [self._objective_info(name) for name in names]

    def _objective_info(self, name: str) -> ObjectiveInfo:
        with self._sessions() as session:
            row = self._objective_row(session, name)
            count = session.scalar(
                select(func.count()).select_from(ValueHeadVersion).where(ValueHeadVersion.objective_id == row.id)
            )
            latest = session.scalar(
                select(func.max(ValueHeadVersion.version)).where(
                    ValueHeadVersion.objective_id == row.id, ValueHeadVersion.status == "ready"
                )
            )
            reward_range = (
                (row.reward_min, row.reward_max) if row.reward_min is not None and row.reward_max is not None else None
            )
            return ObjectiveInfo(
                name=row.name,
                description=row.description,
                reward_range=reward_range,
                version_count=count or 0,
                latest_ready_version=latest,
                aliases=self._aliases(session, row.id),
            )

    @staticmethod
    def _objective_row(session: Session, name: str) -> Objective:
        row = session.scalar(select(Objective).where(Objective.name == name))
        if row is None:
            known = session.scalars(select(Objective.name).order_by(Objective.name)).all()
            raise NotFoundError(f"unknown objective {name!r}; registered: {', '.join(known) or '(none)'}")
        return row

    @staticmethod
    def _aliases(session: Session, objective_id: int) -> dict[str, int]:
        rows = session.execute(
            select(Alias.name, ValueHeadVersion.version)
            .join(ValueHeadVersion, Alias.version_id == ValueHeadVersion.id)
            .where(Alias.objective_id == objective_id)
            .order_by(Alias.name)
        ).all()
        return {alias: version for alias, version in rows}

    # Versions ---------------------------------------------------------------------------

    def register_version(
        self,
        objective: str,
        artifact: ArtifactSource,
        *,
        base_model_id: str,
        tokenizer_fingerprint: str,
        architecture: Mapping[str, Any],
        iteration: int,
        training_params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        normalization: Mapping[str, Any],
        parents: Sequence[int] = (),
        training_job_id: str | None = None,
        status: str = "ready",
        base_weights_fingerprint: str | None = None,
    ) -> VersionInfo:
        """Store ``artifact`` (a .safetensors path or its bytes) and register it as the next
        version of ``objective`` (created if new), in one transaction.

        ``base_weights_fingerprint`` defaults to the one the head artifact records, so that
        ``objective``, ``@latest`` resolve among versions trained on the loaded base.

        Version numbers are allocated by incrementing the objective row's counter, which locks
        that row until commit on PostgreSQL and takes the write lock on SQLite, so concurrent
        registrations get consecutive numbers; a unique (objective, version) constraint backs
        it up. A second registration with the same ``training_job_id`` returns the first
        version unchanged. If registration fails, no row is left and an artifact written by
        this call (and referenced by no other version) is removed.

        Raises:
            SpecError: ``objective`` is not a valid name.
            ConfigurationError: a metadata argument has the wrong type or is not JSON.
            NotFoundError: a parent version id does not exist.
            RegistryError: ``training_job_id`` already registered a version of another objective.
            ArtifactError: the artifact file is missing or cannot be stored.
        """
        name = validate_name(objective, "objective name")
        if status not in VERSION_STATUSES:
            raise ConfigurationError(f"status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
        for label, text in (
            ("base_model_id", base_model_id),
            ("tokenizer_fingerprint", tokenizer_fingerprint),
        ):
            if not isinstance(text, str) or not text:
                raise ConfigurationError(f"{label} must be a non-empty string, got {text!r}")
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ConfigurationError(f"iteration must be an int >= 0, got {iteration!r}")
        fields = {
            "architecture": _json_field("architecture", architecture),
            "training_params": _json_field("training_params", training_params),
            "metrics": _json_field("metrics", metrics),
            "normalization": _json_field("normalization", normalization),
        }
        parent_ids = sorted({int(parent) for parent in parents})
        if training_job_id is not None:
            existing = self._version_for_job(training_job_id, name)
            if existing is not None:
                return existing

        if base_weights_fingerprint is None:
            base_weights_fingerprint = _recorded_weights_fingerprint(artifact)
        stored, created = self.store.put_new(artifact)
        columns = {
            "status": status,
            "artifact_uri": stored.uri,
            "sha256": stored.sha256,
            "size_bytes": stored.size_bytes,
            "base_model_id": base_model_id,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "base_weights_fingerprint": base_weights_fingerprint or None,
            "iteration": iteration,
            **fields,
        }
        try:
            lost_race: IntegrityError | None = None
            for _ in range(REGISTER_ATTEMPTS):
                try:
                    return self._insert_version(name, parent_ids, training_job_id, columns)
                except IntegrityError as exc:  # a concurrent registration took the same key
                    lost_race = exc
                except _AlreadyRegistered:
                    # Another registration of this job won the race: drop our copy, return theirs.
                    assert training_job_id is not None
                    found = self._version_for_job(training_job_id, name)
                    if found is not None:
                        if created and found.artifact_uri != stored.uri:
                            self._delete_if_unreferenced(stored.uri)
                        return found
            raise RegistryError(
                f"could not register a version of {name!r} after {REGISTER_ATTEMPTS} attempts: {lost_race}"
            ) from lost_race
        except BaseException:
            if created:
                self._delete_if_unreferenced(stored.uri)
            raise

    def _insert_version(
        self, name: str, parent_ids: list[int], training_job_id: str | None, columns: dict[str, Any]
    ) -> VersionInfo:
        """One registration transaction; ``columns`` are the new row's metadata columns."""
        with self._sessions.begin() as session:
            # The first statement writes: it row-locks the objective (PostgreSQL) or takes the
            # database write lock (SQLite) before anything is read, so no two registrations
            # can see the same counter value.
            allocated = session.execute(
                update(Objective)
                .where(Objective.name == name)
                .values(last_version=Objective.last_version + 1)
                .returning(Objective.id, Objective.last_version)
                .execution_options(synchronize_session=False)
            ).first()
            if allocated is None:
                new_objective = Objective(name=name, last_version=1)
                session.add(new_objective)
                session.flush()  # a concurrent creator makes this raise IntegrityError: retried
                objective_id, version = new_objective.id, 1
            else:
                objective_id, version = allocated
            if training_job_id is not None:
                existing = session.scalar(
                    select(ValueHeadVersion).where(ValueHeadVersion.training_job_id == training_job_id)
                )
                if existing is not None:
                    raise _AlreadyRegistered
            parent_rows = (
                session.scalars(select(ValueHeadVersion).where(ValueHeadVersion.id.in_(parent_ids))).all()
                if parent_ids
                else []
            )
            missing = sorted(set(parent_ids) - {row.id for row in parent_rows})
            if missing:
                raise NotFoundError(f"parent version ids {missing} do not exist")
            row = ValueHeadVersion(
                objective_id=objective_id,
                version=version,
                training_job_id=training_job_id,
                parents=list(parent_rows),
                **columns,
            )
            session.add(row)
            session.flush()
            session.refresh(row, ["objective", "parents"])
            return VersionInfo.from_row(row)

    def _version_for_job(self, training_job_id: str, objective: str) -> VersionInfo | None:
        with self._sessions() as session:
            row = session.scalar(self._version_query().where(ValueHeadVersion.training_job_id == training_job_id))
            if row is None:
                return None
            if row.objective.name != objective:
                raise RegistryError(
                    f"training job {training_job_id!r} already registered "
                    f"{row.objective.name}@{row.version}, not a version of {objective!r}"
                )
            return VersionInfo.from_row(row)

    def _delete_if_unreferenced(self, uri: str) -> None:
        with self._sessions() as session:
            referenced = session.scalar(select(ValueHeadVersion.id).where(ValueHeadVersion.artifact_uri == uri))
        if referenced is None:
            self.store.delete(uri)

    @staticmethod
    def _version_query() -> Any:
        return select(ValueHeadVersion).options(
            selectinload(ValueHeadVersion.objective), selectinload(ValueHeadVersion.parents)
        )

    def resolve(
        self,
        spec: str | HeadSpec,
        *,
        tokenizer_fingerprint: str | None = None,
        weights_fingerprint: str | None = None,
    ) -> VersionInfo:
        """The version a spec names: ``objective`` / ``objective@latest`` (newest ready version),
        ``objective@3``, or ``objective@alias``. Archived versions resolve only when named by
        number or alias.

        Given the loaded base's fingerprints, ``objective`` and ``@latest`` mean the newest
        ready version trained on that base (same tokenizer and, where both are recorded, the
        same weights; ``weights_fingerprint=None`` accepts any weights), and a version named by
        number or alias is checked against it.

        Raises:
            SpecError: the spec is malformed.
            NotFoundError: no such objective, version or alias (the message lists what exists),
                or the objective has no ready version.
            IncompatibleHeadError: no ready version was trained on the given base, or the named
                one was trained on another (the message names both).
            RegistryError: the named version is pending or failed.
        """
        with self._sessions() as session:
            return VersionInfo.from_row(self._resolve_row(session, spec, (tokenizer_fingerprint, weights_fingerprint)))

    def _resolve_row(
        self, session: Session, spec: str | HeadSpec, base: tuple[str | None, str | None] = (None, None)
    ) -> ValueHeadVersion:
        head = spec if isinstance(spec, HeadSpec) else parse_spec(spec)
        objective = self._objective_row(session, head.objective)
        query = self._version_query().where(ValueHeadVersion.objective_id == objective.id)
        if head.selector is None or head.selector == LATEST:
            rows = session.scalars(
                query.where(ValueHeadVersion.status == "ready").order_by(ValueHeadVersion.version.desc())
            ).all()
            if not rows:
                raise NotFoundError(
                    f"objective {objective.name!r} has no ready version; versions: "
                    f"{self._describe_versions(session, objective.id)}"
                )
            for row in rows:
                if _trained_on(row, base):
                    return row
            listed = "; ".join(f"{r.version}: {_describe_base(r)}" for r in rows)
            raise IncompatibleHeadError(
                f"objective {objective.name!r} has no ready version trained on the loaded base "
                f"({_describe_fingerprints(*base)}); ready versions: {listed}. Train one for this base, "
                "or pass allow_other_base=True to use a version trained on other weights with this tokenizer"
            )
        if isinstance(head.selector, int):
            row = session.scalar(query.where(ValueHeadVersion.version == head.selector))
            if row is None:
                raise NotFoundError(
                    f"{objective.name!r} has no version {head.selector}; versions: "
                    f"{self._describe_versions(session, objective.id)}"
                )
        else:
            alias = session.scalar(select(Alias).where(Alias.objective_id == objective.id, Alias.name == head.selector))
            if alias is None:
                aliases = self._aliases(session, objective.id)
                listed = ", ".join(f"{name} -> {version}" for name, version in aliases.items())
                raise NotFoundError(f"{objective.name!r} has no alias {head.selector!r}; aliases: {listed or '(none)'}")
            row = session.scalar(query.where(ValueHeadVersion.id == alias.version_id))
            assert row is not None  # the foreign key guarantees it
        if row.status not in LOADABLE_STATUSES:
            raise RegistryError(f"{objective.name}@{row.version} is {row.status}, not loadable")
        if not _trained_on(row, base):
            raise IncompatibleHeadError(
                f"{head} resolves to {objective.name}@{row.version}, trained on {_describe_base(row)}; "
                f"the loaded base has {_describe_fingerprints(*base)}. Retrain it for this base, or pass "
                "allow_other_base=True to transfer it deliberately (same tokenizer only)"
            )
        return row

    @staticmethod
    def _describe_versions(session: Session, objective_id: int) -> str:
        rows = session.execute(
            select(ValueHeadVersion.version, ValueHeadVersion.status)
            .where(ValueHeadVersion.objective_id == objective_id)
            .order_by(ValueHeadVersion.version)
        ).all()
        return ", ".join(f"{version} ({status})" for version, status in rows) or "(none)"

    def fetch_artifact(self, version: VersionInfo | str) -> Path:
        """A local path to the version's artifact, its sha256 verified just now.

        Raises:
            ArtifactError: the artifact is missing or does not match its sha256.
        """
        info = version if isinstance(version, VersionInfo) else self.resolve(version)
        return self.store.fetch(info.artifact_uri, info.sha256)

    def list_versions(self, objective: str | None = None, *, include_archived: bool = True) -> list[VersionInfo]:
        """Versions of ``objective`` (or of all objectives), ordered by objective and version.

        Raises:
            NotFoundError: ``objective`` is not registered.
        """
        with self._sessions() as session:
            query = self._version_query().join(Objective).order_by(Objective.name, ValueHeadVersion.version)
            if objective is not None:
                query = query.where(ValueHeadVersion.objective_id == self._objective_row(session, objective.lower()).id)
            if not include_archived:
                query = query.where(ValueHeadVersion.status != "archived")
            return [VersionInfo.from_row(row) for row in session.scalars(query).all()]

    def show(self, spec: str | HeadSpec) -> VersionDetail:
        """The version ``spec`` names, with its aliases, parents and children.

        Raises:
            the errors of ``resolve``.
        """
        with self._sessions() as session:
            row = self._resolve_row(session, spec)
            children = session.scalars(
                self._version_query().where(ValueHeadVersion.parents.any(ValueHeadVersion.id == row.id))
            ).all()
            aliases = session.scalars(select(Alias.name).where(Alias.version_id == row.id).order_by(Alias.name))
            return VersionDetail(
                version=VersionInfo.from_row(row),
                aliases=tuple(aliases),
                parents=tuple(VersionInfo.from_row(parent) for parent in sorted(row.parents, key=_order)),
                children=tuple(VersionInfo.from_row(child) for child in sorted(children, key=_order)),
            )

    def archive(self, spec: str | HeadSpec) -> VersionInfo:
        """Mark the version ``spec`` names as archived: ``objective`` and ``objective@latest``
        skip it from now on; it still resolves by number or alias, and its artifact is kept.

        Raises:
            the errors of ``resolve``.
        """
        with self._sessions.begin() as session:
            row = self._resolve_row(session, spec)
            row.status = "archived"
            session.flush()
            return VersionInfo.from_row(row)

    # Aliases ----------------------------------------------------------------------------

    def set_alias(self, objective: str, alias: str, version: int) -> VersionInfo:
        """Point ``objective@alias`` at ``version`` (creating or moving the alias).

        Raises:
            SpecError: ``alias`` is not a valid alias name (all digits and ``latest`` are reserved).
            NotFoundError: no such objective or version.
            RegistryError: the version is not ready.
        """
        name = validate_alias(alias)
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                with self._sessions.begin() as session:
                    row = self._resolve_row(session, HeadSpec(validate_name(objective, "objective name"), version))
                    if row.status != "ready":
                        raise RegistryError(
                            f"cannot point alias {name!r} at {row.objective.name}@{row.version}: it is {row.status}"
                        )
                    existing = session.scalar(
                        select(Alias).where(Alias.objective_id == row.objective_id, Alias.name == name)
                    )
                    if existing is None:
                        session.add(Alias(objective_id=row.objective_id, name=name, version_id=row.id))
                    else:
                        existing.version_id = row.id
                        existing.updated_at = utcnow()
                    return VersionInfo.from_row(row)
            except IntegrityError:  # created concurrently: move the winner's alias instead
                if attempt == REGISTER_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def list_aliases(self, objective: str) -> dict[str, int]:
        """The aliases of ``objective``: alias name -> version number, by name.

        Raises:
            NotFoundError: ``objective`` is not registered.
        """
        with self._sessions() as session:
            return self._aliases(session, self._objective_row(session, objective.strip().lower()).id)

    def delete_alias(self, objective: str, alias: str) -> None:
        """Remove ``objective@alias``.

        Raises:
            NotFoundError: no such objective or alias (the message lists the aliases).
        """
        with self._sessions.begin() as session:
            row = self._objective_row(session, validate_name(objective, "objective name"))
            name = alias.strip().lower()
            existing = session.scalar(select(Alias).where(Alias.objective_id == row.id, Alias.name == name))
            if existing is None:
                listed = ", ".join(self._aliases(session, row.id)) or "(none)"
                raise NotFoundError(f"{row.name!r} has no alias {alias!r}; aliases: {listed}")
            session.delete(existing)

    # Presets ----------------------------------------------------------------------------

    def create_preset(
        self,
        name: str,
        weights: Mapping[str, float],
        pinned_specs: Iterable[str] | None = None,
        *,
        replace: bool = False,
    ) -> PresetInfo:
        """Save named weights. Every weighted objective must be registered; each pinned spec
        must resolve now and name a weighted objective, at most one per objective.

        Raises:
            SpecError: a bad preset name or pinned spec.
            UnknownObjectiveError, InvalidWeightError: from ``validate_weights``.
            NotFoundError: a pinned spec does not resolve.
            RegistryError: the preset exists and ``replace`` is false, or two pins share an objective.
        """
        preset_name = validate_name(name, "preset name")
        with self._sessions() as session:
            registered = session.scalars(select(Objective.name)).all()
        clean = validate_weights(weights, registered)
        pins: list[str] = []
        pinned_objectives: set[str] = set()
        for text in pinned_specs or ():
            head = parse_spec(text)
            if head.objective not in clean:
                raise ConfigurationError(
                    f"pinned spec {text!r} names {head.objective!r}, which the weights do not: "
                    f"{', '.join(sorted(clean)) or '(none)'}"
                )
            if head.objective in pinned_objectives:
                raise RegistryError(f"objective {head.objective!r} is pinned twice")
            pinned_objectives.add(head.objective)
            self.resolve(head)
            pins.append(str(head))
        with self._sessions.begin() as session:
            existing = session.scalar(select(Preset).where(Preset.name == preset_name))
            if existing is not None and not replace:
                raise RegistryError(f"preset {preset_name!r} exists; pass replace=True to overwrite it")
            if existing is not None:
                session.delete(existing)
                session.flush()
            row = Preset(name=preset_name, weights=clean, pinned_specs=pins or None)
            session.add(row)
            session.flush()
            return self._preset_info(row)

    def get_preset(self, name: str) -> PresetInfo:
        """The preset ``name``.

        Raises:
            NotFoundError: no such preset (the message lists the presets).
        """
        with self._sessions() as session:
            return self._preset_info(self._preset_row(session, name))

    def list_presets(self) -> list[PresetInfo]:
        """Every preset, by name."""
        with self._sessions() as session:
            return [self._preset_info(row) for row in session.scalars(select(Preset).order_by(Preset.name))]

    def delete_preset(self, name: str) -> None:
        """Remove the preset ``name``.

        Raises:
            NotFoundError: no such preset.
        """
        with self._sessions.begin() as session:
            session.delete(self._preset_row(session, name))

    @staticmethod
    def _preset_row(session: Session, name: str) -> Preset:
        key = name.strip().lower() if isinstance(name, str) else name
        row = session.scalar(select(Preset).where(Preset.name == key))
        if row is None:
            known = session.scalars(select(Preset.name).order_by(Preset.name)).all()
            raise NotFoundError(f"unknown preset {name!r}; presets: {', '.join(known) or '(none)'}")
        return row

    @staticmethod
    def _preset_info(row: Preset) -> PresetInfo:
        return PresetInfo(
            name=row.name,
            weights={key: float(value) for key, value in row.weights.items()},
            pinned_specs=tuple(row.pinned_specs or ()),
            created_at=_aware(row.created_at) or row.created_at,
        )

    # Training jobs ----------------------------------------------------------------------

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


def _order(row: ValueHeadVersion) -> tuple[str, int]:
    return (row.objective.name, row.version)


def _trained_on(row: ValueHeadVersion, base: tuple[str | None, str | None]) -> bool:
    """Whether ``row`` was trained on a base with these (tokenizer, weights) fingerprints; a
    fingerprint not given, or not recorded with the version, does not rule it out."""
    tokenizer, weights = base
    if tokenizer is not None and row.tokenizer_fingerprint != tokenizer:
        return False
    return weights is None or not row.base_weights_fingerprint or row.base_weights_fingerprint == weights


def _describe_fingerprints(tokenizer: str | None, weights: str | None) -> str:
    parts = [f"tokenizer {tokenizer[:12]}" if tokenizer else "", f"weights {weights[:12]}" if weights else ""]
    return ", ".join(p for p in parts if p) or "no fingerprint"


def _describe_base(row: ValueHeadVersion) -> str:
    fingerprints = _describe_fingerprints(row.tokenizer_fingerprint, row.base_weights_fingerprint)
    return f"base {row.base_model_id!r} ({fingerprints})"


def _recorded_weights_fingerprint(artifact: ArtifactSource) -> str | None:
    """The base weights fingerprint a head artifact records, if it is one that records it."""
    from mavis_lc.errors import ModelLoadError
    from mavis_lc.value_models import read_head_config

    try:
        config, _ = read_head_config(artifact if isinstance(artifact, bytes) else Path(artifact))
    except (ModelLoadError, OSError, ValueError):
        return None
    return config.base_weights_fingerprint or None
