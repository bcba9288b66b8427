"""Engines, sessions and migrations of the registry database.

SQLite (the embedded default) gets ``PRAGMA foreign_keys=ON`` and a busy timeout on every
connection; ``postgresql://`` URLs use psycopg 3. ``upgrade`` and ``check`` run the Alembic
migrations shipped inside the package, so they work from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from mavis_lc.errors import ConfigurationError
from mavis_lc.settings import get_settings

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another writer before giving up."""


def script_location() -> str:
    """The Alembic migrations: ``mavis_lc/migrations`` in an installed package (the wheel maps the
    repository's top-level ``migrations/`` there), else the checkout's ``migrations/`` (editable)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "migrations", here.parents[2] / "migrations"):
        if (candidate / "env.py").is_file():
            return str(candidate)
    raise RuntimeError(f"the registry migrations are missing next to {here.parents[1]}; reinstall mavis-lc")


def normalize_url(url: str) -> str:
    """Return ``url`` with ``postgres://`` / ``postgresql://`` pinned to the psycopg 3 driver.

    Raises:
        ConfigurationError: the URL cannot be parsed.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError, but be strict about what leaves
        raise ConfigurationError(f"cannot parse database URL {url!r}: {exc}") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def resolve_url(url: str | None) -> str:
    """``url`` if given, else ``MAVIS_DATABASE_URL`` / the embedded SQLite default, normalised."""
    return normalize_url(url if url is not None else get_settings().resolved_database_url())


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def create_registry_engine(url: str | None = None) -> Engine:
    """A SQLAlchemy engine for the registry at ``url`` (default: from settings).

    A SQLite file's parent folder is created; ``sqlite://`` (in memory) shares one connection
    so every session sees the same database.
    """
    resolved = make_url(resolve_url(url))
    if resolved.get_backend_name() == "sqlite":
        database = resolved.database
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        if not database or database == ":memory:":
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"]["check_same_thread"] = False
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(resolved, **kwargs)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    if resolved.get_backend_name() == "postgresql":
        from mavis_lc.extras import require

        require("psycopg", "postgres", f"the registry at {resolved.render_as_string(hide_password=True)}")
    return create_engine(resolved, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (the API returns plain values)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations and at ``url`` (default: settings)."""
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["database_url"] = resolve_url(url)
    return config


def upgrade(url: str | Engine | None = None, revision: str = "head") -> None:
    """Migrate the registry database at ``url`` (default: settings) up to ``revision``.

    ``url`` may also be an engine, which is how an in-memory SQLite registry is migrated.
    """
    if isinstance(url, Engine):
        _upgrade_engine(url, alembic_config(url.url.render_as_string(hide_password=False)), revision)
        return
    config = alembic_config(url)
    engine = create_registry_engine(config.attributes["database_url"])
    try:
        _upgrade_engine(engine, config, revision)
    finally:
        engine.dispose()


def _upgrade_engine(engine: Engine, config: Config, revision: str) -> None:
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str | None:
    """The newest migration revision shipped with the package."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check(url: str | None = None) -> list[str]:
    """Differences between the database at ``url`` and the models, like ``alembic check``.

    Returns an empty list when the database is at the newest revision and its schema matches
    the models; otherwise one line per difference (a missing migration, or a database that
    has not been upgraded).
    """
    from mavis_lc.registry.models import Base

    engine = create_registry_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
            current = context.get_current_revision()
            head = head_revision()
            if current != head:
                return [f"database is at revision {current or '(none)'}, the newest is {head}"]
            return [str(diff) for diff in compare_metadata(context, Base.metadata)]
    finally:
        engine.dispose()
