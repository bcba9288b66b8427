"""Alembic environment of the registry.

The database URL is, in order: a connection passed in ``config.attributes["connection"]``
(what ``mavis_lc.registry.db.upgrade`` does), ``config.attributes["database_url"]``,
``alembic -x url=...``, then ``MAVIS_DATABASE_URL`` / the embedded SQLite default.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from mavis_lc.registry.db import create_registry_engine, resolve_url
from mavis_lc.registry.models import Base

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _url() -> str:
    given = config.attributes.get("database_url") or context.get_x_argument(as_dictionary=True).get("url")
    return resolve_url(given)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_registry_engine(_url())
    try:
        with engine.connect() as new_connection:
            _configure(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
