"""The registry on the machine's PostgreSQL: the API contract, migrations, and concurrent registration.

Each test creates its own database with a random name and drops it afterwards. Set
``MAVIS_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``) to point at
another server; the tests are skipped when it cannot be reached.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from mavis_lc.registry import ArtifactStore, Registry, check, create_registry_engine, upgrade
from tests.integration.workers import SERVICES_REQUIRED
from tests.unit.test_registry_api import RegistryContract, register

pytestmark = pytest.mark.integration

ADMIN_URL = os.environ.get("MAVIS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin_connection() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    try:
        admin = _admin_connection()
    except psycopg.OperationalError as exc:
        if SERVICES_REQUIRED:
            raise
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {exc}")
    name = f"mavis_test_{uuid.uuid4().hex[:16]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TestRegistryPostgres(RegistryContract):
    @pytest.fixture
    def registry(self, postgres_url: str, tmp_path: Path) -> Iterator[Registry]:
        upgrade(postgres_url)
        store = ArtifactStore(tmp_path / "artifacts", cache_dir=tmp_path / "cache")
        with Registry(postgres_url, store) as registry:
            yield registry


def test_registry_uses_psycopg3(postgres_url: str) -> None:
    engine = create_registry_engine(postgres_url)
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_migrations_up_check_down_on_postgres(postgres_url: str) -> None:
    assert check(postgres_url) == ["database is at revision (none), the newest is 0002"]
    upgrade(postgres_url)
    assert check(postgres_url) == []
    upgrade(postgres_url)  # idempotent
    assert check(postgres_url) == []
    engine = create_registry_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE presets ADD COLUMN stray integer"))
    finally:
        engine.dispose()
    assert any("stray" in line for line in check(postgres_url))


def test_migrations_up_and_check_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    assert check(url) == ["database is at revision (none), the newest is 0002"]
    upgrade(url)
    assert check(url) == []


def _register_two(url: str, artifacts: str, barrier: Any, results: Any, worker: int) -> None:
    with Registry(url, ArtifactStore(artifacts)) as registry:
        barrier.wait()
        for n in range(2):
            info = register(registry, "positivity", f"worker {worker} head {n}".encode())
            results.put((worker, info.version))


def test_16_concurrent_registrations_from_8_processes(postgres_url: str, tmp_path: Path) -> None:
    upgrade(postgres_url)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(8), context.Queue()
    artifacts = str(tmp_path / "artifacts")
    workers = [
        context.Process(target=_register_two, args=(postgres_url, artifacts, barrier, results, w)) for w in range(8)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [process.exitcode for process in workers] == [0] * 8
    versions = sorted(results.get(timeout=5)[1] for _ in range(16))
    assert versions == list(range(1, 17))
    with Registry(postgres_url, ArtifactStore(artifacts)) as registry:
        listed = registry.list_versions("positivity")
        assert [info.version for info in listed] == list(range(1, 17))
        assert len({info.sha256 for info in listed}) == 16
        for info in listed:
            assert registry.fetch_artifact(info).read_bytes().startswith(b"worker ")
