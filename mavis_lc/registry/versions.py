"""Value-head versions and aliases: registration (artifact, metadata and lineage in one
transaction), resolution of head specs against a base model, archiving, and the names such as
``production`` that point at versions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from mavis_lc.errors import (
    ConfigurationError,
    IncompatibleHeadError,
    NotFoundError,
    RegistryError,
)
from mavis_lc.registry.base import REGISTER_ATTEMPTS, RegistryBase
from mavis_lc.registry.models import (
    VERSION_STATUSES,
    Alias,
    Objective,
    ValueHeadVersion,
    utcnow,
)
from mavis_lc.registry.records import (
    VersionDetail,
    VersionInfo,
    _json_field,
)
from mavis_lc.registry.specs import LATEST, HeadSpec, parse_spec, validate_alias, validate_name
from mavis_lc.registry.store import ArtifactSource

LOADABLE_STATUSES = ("ready", "archived")


class _AlreadyRegistered(Exception):
    """Raised inside the registration transaction to roll it back: the job already has a version."""


class VersionsMixin(RegistryBase):
    """Versions and aliases of a `Registry`."""

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
