"""Alembic environment: one script for Postgres and SQLite, for the CLI and for Python.

The database URL comes from, in order: ``alembic -x url=...``, ``config.attributes["url"]``
(set by ``src.db.upgrade()``), ``sqlalchemy.url`` in the ini file, and finally the project
settings (``URBANSOUND_DATABASE_URL``, default SQLite under ``var/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from logging.config import fileConfig
from pathlib import Path

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.db import EXPRESSION_INDEXES, Base, make_engine
from src.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Expression indexes are written by hand; reflection would see them as always changed."""
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


def database_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.attributes.get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().db_url
    )


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


MIGRATION_LOCK = 0x55_53_38_4D  # "US8M"


@contextlib.contextmanager
def sqlite_file_lock(url: sa.URL) -> Iterator[None]:
    """Every process may run ``upgrade`` at start (web, worker): on SQLite they take turns."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        yield
        return
    with open(f"{url.database}.migrate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_migrations_online() -> None:
    # NullPool: a migration is one short connection; make_engine adds the SQLite pragmas and
    # turns "cannot connect" into a one-line DatabaseUnavailable for the CLI.
    engine = make_engine(database_url(), poolclass=NullPool)
    try:
        with sqlite_file_lock(engine.url), engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
                include_object=include_object,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Concurrent upgrades (replicas starting together) run one after the other;
                    # the second then finds the schema current. Released at commit.
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                                       {"k": MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
