"""SQLAlchemy models of the registry: objectives, value-head versions, aliases, lineage,
training jobs and weight presets.

The Alembic migrations in ``migrations/`` (shipped as ``mavis_lc/migrations``) create exactly these tables;
``mavis db check`` fails when the two drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAME_LENGTH = 64
"""Longest objective, alias or preset name (the spec grammar allows 64 characters)."""

VERSION_STATUSES = ("pending", "ready", "failed", "archived")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (what every timestamp column stores)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so SQLite batch migrations can name constraints."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
    }


lineage = Table(
    "lineage",
    Base.metadata,
    Column("child_id", ForeignKey("value_head_versions.id", ondelete="CASCADE"), primary_key=True),
    Column("parent_id", ForeignKey("value_head_versions.id", ondelete="CASCADE"), primary_key=True),
)
"""Which versions a version was derived from (warm start, merge); many-to-many."""


class Objective(Base):
    """A named reward with its value-head versions. ``last_version`` allocates version numbers."""

    __tablename__ = "objectives"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    reward_min: Mapped[float | None] = mapped_column(Float)
    reward_max: Mapped[float | None] = mapped_column(Float)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ValueHeadVersion]] = relationship(back_populates="objective")


class ValueHeadVersion(Base):
    """One trained value head: an artifact plus everything needed to load and judge it."""

    __tablename__ = "value_head_versions"
    __table_args__ = (
        UniqueConstraint("objective_id", "version"),
        CheckConstraint("status IN ('pending', 'ready', 'failed', 'archived')", name="status"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    objective_id: Mapped[int] = mapped_column(ForeignKey("objectives.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    artifact_uri: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[str] = mapped_column(String(512))
    tokenizer_fingerprint: Mapped[str] = mapped_column(String(128))
    base_weights_fingerprint: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """`BaseModel.weights_fingerprint` of the base the head was trained on (NULL: not recorded)."""
    architecture: Mapped[dict[str, Any]]
    iteration: Mapped[int] = mapped_column(Integer)
    training_params: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    normalization: Mapped[dict[str, Any]]
    training_job_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    objective: Mapped[Objective] = relationship(back_populates="versions")
    parents: Mapped[list[ValueHeadVersion]] = relationship(
        secondary=lineage,
        primaryjoin=lambda: ValueHeadVersion.id == lineage.c.child_id,
        secondaryjoin=lambda: ValueHeadVersion.id == lineage.c.parent_id,
        back_populates="children",
    )
    children: Mapped[list[ValueHeadVersion]] = relationship(
        secondary=lineage,
        primaryjoin=lambda: ValueHeadVersion.id == lineage.c.parent_id,
        secondaryjoin=lambda: ValueHeadVersion.id == lineage.c.child_id,
        back_populates="parents",
    )


class Alias(Base):
    """A movable name (``production``, ``staging``) for one version of one objective."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("objective_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    objective_id: Mapped[int] = mapped_column(ForeignKey("objectives.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    version_id: Mapped[int] = mapped_column(ForeignKey("value_head_versions.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    objective: Mapped[Objective] = relationship()
    version: Mapped[ValueHeadVersion] = relationship()


class TrainingJob(Base):
    """A request to train one objective, and what became of it. Workers claim rows by compare-and-set."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    objective: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[dict[str, Any]]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256))
    heartbeat_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("value_head_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Preset(Base):
    """A named set of objective weights, optionally pinning the head version of each objective."""

    __tablename__ = "presets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    weights: Mapped[dict[str, Any]]
    pinned_specs: Mapped[list[Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
