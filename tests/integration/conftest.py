"""Real databases for the persistence tests: Postgres on 127.0.0.1:5432 and SQLite files.

Each test session creates its own Postgres database (``urbansound_test_<random>``) and drops
it at the end, so runs never see each other's rows. Where Postgres is not reachable the tests
that need it fail when ``CI`` is set (CI must provide it) and are skipped elsewhere, saying why.
Set ``URBANSOUND_TEST_PG_ADMIN`` to use another server (a URL to an existing database on it).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from web_helpers import pg_admin_engine

APP_TABLES = ("clips", "upload_rejects", "uploads", "training_jobs", "model_versions")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    engine = pg_admin_engine()
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_database_factory(pg_admin: sa.Engine) -> Iterator[Callable[[], str]]:
    """Creates empty databases on demand; all of them are dropped when the session ends."""
    created: list[str] = []

    def make() -> str:
        name = f"urbansound_test_{secrets.token_hex(5)}"
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return pg_admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    from src import db

    db.dispose_engines()  # pooled connections would block DROP DATABASE
    with pg_admin.connect() as conn:
        for name in created:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database_factory: Callable[[], str]) -> str:
    """The session's Postgres database, migrated to head."""
    from src import db

    url = pg_database_factory()
    db.upgrade(url)
    return url


@pytest.fixture()
def pg_clean(pg_url: str) -> str:
    """The session database with every application table emptied before the test."""
    from src import db

    with db.get_engine(pg_url).begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(APP_TABLES)} RESTART IDENTITY CASCADE")
    return pg_url


@pytest.fixture()
def sqlite_url(tmp_path) -> str:
    """An empty SQLite database file (no tables)."""
    return f"sqlite:///{tmp_path / 'db' / 'urbansound.db'}"


@pytest.fixture()
def sqlite_migrated(sqlite_url: str) -> str:
    from src import db

    db.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database on each backend in turn."""
    return request.getfixturevalue("sqlite_migrated" if request.param == "sqlite" else "pg_clean")


@pytest.fixture(scope="session")
def pg_scratch_url(pg_database_factory: Callable[[], str]) -> str:
    return pg_database_factory()


@pytest.fixture()
def pg_empty(pg_scratch_url: str) -> str:
    """A Postgres database with no tables at all. One database is reused and wiped (dropping
    its schema takes milliseconds, dropping a database seconds)."""
    from src import db

    db.dispose_engines()  # no pooled connection may hold locks on what is dropped
    engine = sa.create_engine(pg_scratch_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        engine.dispose()
    return pg_scratch_url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """A database without any tables on each backend in turn (for migration tests)."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_empty")
