"""The registry's connection (database + artifact store) and its objectives, which every
other part of the registry builds on."""

from __future__ import annotations

from typing import Self

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mavis_lc.errors import (
    ConfigurationError,
    NotFoundError,
)
from mavis_lc.registry.db import create_registry_engine, resolve_url, session_factory, upgrade
from mavis_lc.registry.models import (
    Alias,
    Objective,
    ValueHeadVersion,
)
from mavis_lc.registry.records import (
    ObjectiveInfo,
)
from mavis_lc.registry.specs import validate_name
from mavis_lc.registry.store import ArtifactStore

REGISTER_ATTEMPTS = 5
"""How often a registration that lost a race (unique constraint) is retried."""


class RegistryBase:
    """The database and artifact store of a registry, and its objectives."""

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

    def __enter__(self) -> Self:
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
