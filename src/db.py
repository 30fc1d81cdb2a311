"""The relational record of the system: uploads, clips, training jobs and model versions.

One schema serves the embedded set-up (SQLite) and the full stack (Postgres), so only portable
types are used: strings with CHECK constraints instead of native enums (adding a status is a
one-line migration on both), ``JSON`` (``JSONB`` on Postgres, for indexing and ``->>`` queries)
and timezone-aware timestamps that come back as UTC on both backends.

Rejected upload files are kept in their own table, ``upload_rejects``, rather than as rows of
``clips`` with a status: a reject usually has no stored file, often no duration or rate, and may
repeat content that was accepted earlier; keeping it out of ``clips`` lets ``clips.sha256`` be a
plain UNIQUE constraint, which is what makes deduplication safe under concurrent uploads.

The schema itself is owned by Alembic (``migrations/``); ``Base.metadata`` is its model and a
test proves that the two agree. ``upgrade()``/``downgrade()`` run Alembic from Python so that the
CLI, the web app and tests share one path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from .errors import Unavailable

if TYPE_CHECKING:  # alembic is imported only when migrating
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


# --------------------------------------------------------------------------- errors

class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (or has no schema); ``message`` says what to do."""

    code = "database_unavailable"


class SchemaMissing(DatabaseUnavailable):
    """Reachable, but the tables are not there: the fix is a migration, not a restart."""


# --------------------------------------------------------------------------- types

def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite drops the zone on the way back; without this,
    comparing a Postgres-loaded and a SQLite-loaded timestamp would raise in one set-up only."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use src.db.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class UploadSource(StrEnum):
    api = "api"
    ui = "ui"
    cli = "cli"


class ClipRole(StrEnum):
    """What an accepted upload is for. Unset until a retrain decides: with a data set installed
    every upload trains; without one, a recording-grouped slice is held out as the gate's test
    set, and a held-out clip never trains (nor does any later clip of the same recording)."""

    train = "train"
    test = "test"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"  # the new model passed the gate and is served
    rejected = "rejected"  # trained fine, but not better than the served model
    failed = "failed"  # crashed, timed out or the worker died


ACTIVE_JOB_STATUSES = (JobStatus.queued, JobStatus.running)
# Indexes on expressions: reflection cannot compare them reliably, so autogenerate skips them
# (migrations/env.py) and a test checks that they exist instead.
EXPRESSION_INDEXES = frozenset({"uq_training_jobs_one_active"})


class VersionStatus(StrEnum):
    candidate = "candidate"
    active = "active"
    rejected = "rejected"
    retired = "retired"


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


# Deterministic constraint names: Alembic batch mode on SQLite and later migrations need them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar = {datetime: UTCDateTime, dict[str, Any]: JSONType}


# --------------------------------------------------------------------------- tables

class Upload(Base):
    """One batch (a request, a CLI call): who sent what, and how much of it was kept."""

    __tablename__ = "uploads"
    __table_args__ = (sa.CheckConstraint(_in("source", list(UploadSource)), name="source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now(),
                                                 index=True)
    client: Mapped[str] = mapped_column(sa.String(200), default="")
    source: Mapped[str] = mapped_column(sa.String(8))
    n_files: Mapped[int] = mapped_column(default=0)
    n_accepted: Mapped[int] = mapped_column(default=0)
    n_rejected: Mapped[int] = mapped_column(default=0)

    clips: Mapped[list[UploadedClip]] = relationship(back_populates="upload")
    rejects: Mapped[list[UploadReject]] = relationship(back_populates="upload")


class UploadedClip(Base):
    """An accepted file, stored under ``uploads_dir / path``; the unit retraining consumes."""

    __tablename__ = "clips"
    __table_args__ = (sa.CheckConstraint(_in("role", list(ClipRole)), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    upload_id: Mapped[int] = mapped_column(sa.ForeignKey("uploads.id"), index=True)
    original_name: Mapped[str] = mapped_column(sa.String(1024))
    path: Mapped[str] = mapped_column(sa.String(512))  # relative to settings.uploads_dir
    label: Mapped[str] = mapped_column(sa.String(64), index=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    duration_s: Mapped[float]
    sample_rate: Mapped[int]
    channels: Mapped[int]
    format: Mapped[str] = mapped_column(sa.String(32), default="")
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    used_in_job_id: Mapped[str | None] = mapped_column(sa.ForeignKey("training_jobs.id"),
                                                       index=True)
    role: Mapped[str | None] = mapped_column(sa.String(8), index=True)  # ClipRole, or undecided
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now(),
                                                 index=True)

    upload: Mapped[Upload] = relationship(back_populates="clips")


class UploadReject(Base):
    """A refused file and why (``reason_code`` is stable, ``message`` is for people)."""

    __tablename__ = "upload_rejects"

    id: Mapped[int] = mapped_column(primary_key=True)
    upload_id: Mapped[int] = mapped_column(sa.ForeignKey("uploads.id"), index=True)
    original_name: Mapped[str] = mapped_column(sa.String(1024))
    reason_code: Mapped[str] = mapped_column(sa.String(32), index=True)
    message: Mapped[str] = mapped_column(sa.Text, default="")
    sha256: Mapped[str | None] = mapped_column(sa.String(64))
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())

    upload: Mapped[Upload] = relationship(back_populates="rejects")


def _new_job_id() -> str:
    return str(uuid.uuid4())


class TrainingJob(Base):
    """A retrain request and its life. At most one job is queued or running at a time: a
    partial unique index enforces it in the database, so two web replicas racing to start a
    job cannot both win (see ``src.jobs.get_or_create_job``)."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        sa.CheckConstraint(_in("status", list(JobStatus)), name="status"),
        sa.Index(
            "uq_training_jobs_one_active",
            sa.text(f"({_in('status', ACTIVE_JOB_STATUSES)})"),
            unique=True,
            postgresql_where=sa.text(_in("status", ACTIVE_JOB_STATUSES)),
            sqlite_where=sa.text(_in("status", ACTIVE_JOB_STATUSES)),
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=_new_job_id)
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.queued, index=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now(),
                                                   index=True)
    requested_by: Mapped[str] = mapped_column(sa.String(200), default="")
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(sa.String(255))  # hostname of the worker
    celery_task_id: Mapped[str | None] = mapped_column(sa.String(255))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # epoch, epochs, loss, val_f1
    base_version: Mapped[str | None] = mapped_column(sa.String(100))
    result_version: Mapped[str | None] = mapped_column(sa.String(100))
    metrics: Mapped[dict[str, Any] | None]
    n_new_clips: Mapped[int | None]
    message: Mapped[str | None] = mapped_column(sa.Text)  # promoted / rejected and why
    error: Mapped[str | None] = mapped_column(sa.Text)  # for failed jobs


class ModelVersion(Base):
    """The database mirror of a registry version. The files under ``models/`` and the
    ``CURRENT`` pointer are the truth for serving; these rows add history and make versions
    queryable. Base/result versions of jobs are plain strings, not foreign keys, because a
    version may exist on disk (trained by the CLI) before it is ever recorded here."""

    __tablename__ = "model_versions"
    __table_args__ = (
        sa.CheckConstraint(_in("status", list(VersionStatus)), name="status"),
        sa.Index("uq_model_versions_one_active", "status", unique=True,
                 postgresql_where=sa.text("status = 'active'"),
                 sqlite_where=sa.text("status = 'active'")),
    )

    version: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    file: Mapped[str] = mapped_column(sa.String(255))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    parent: Mapped[str | None] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now(),
                                                 index=True)
    status: Mapped[str] = mapped_column(sa.String(16), default=VersionStatus.candidate)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    activated_at: Mapped[datetime | None]
    job_id: Mapped[str | None] = mapped_column(sa.String(36))
    message: Mapped[str | None] = mapped_column(sa.Text)  # why it was rejected


# --------------------------------------------------------------------------- engines

def _describe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _is_missing_table(exc: BaseException) -> bool:
    pgcode = getattr(exc, "pgcode", None)
    return pgcode == "42P01" or "no such table" in str(exc)


def _install_error_translation(engine: Engine) -> None:
    """Connection failures anywhere (first connect, a server that went away mid-session,
    a missing SQLite folder) surface as ``DatabaseUnavailable``; a database without tables as
    ``SchemaMissing``. Callers then need one ``except`` (the web app maps it to 503)."""
    where = _describe(engine.url)

    @event.listens_for(engine, "handle_error")
    def translate(ctx: sa.engine.ExceptionContext) -> None:
        orig = ctx.original_exception
        if ctx.is_pre_ping:  # let the pool's pre-ping see the error and reconnect
            return
        if ctx.connection is None or ctx.is_disconnect:
            reason = " ".join(str(orig).split()).rstrip(".?! ") or type(orig).__name__
            raise DatabaseUnavailable(
                f"Database unavailable at {where}: {reason}. Check that it is running and "
                "that URBANSOUND_DATABASE_URL names it."
            ) from orig
        if _is_missing_table(orig):
            raise SchemaMissing(
                f"The database at {where} has no tables yet ({' '.join(str(orig).split())}); "
                "run `urbansound db upgrade`."
            ) from orig


def normalise_url(url: str) -> sa.URL:
    """Accept the spellings people paste: ``postgres://`` (Heroku, many PaaS) and a bare
    ``postgresql://``, which SQLAlchemy 2.1 maps to psycopg 3 while we ship psycopg2."""
    sa_url = sa.make_url(url.replace("postgres://", "postgresql://", 1)
                         if url.startswith("postgres://") else url)
    if sa_url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        sa_url = sa_url.set(drivername="postgresql+psycopg2")
    return sa_url


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """A new engine with the settings each backend needs for a multi-process server.

    SQLite: WAL so readers never block the writer, a busy timeout so concurrent writers wait
    instead of failing, foreign keys on (off by default in SQLite), the folder created.
    Postgres: ``pool_pre_ping`` so a restarted server costs a reconnect, not a failed request.
    """
    from .settings import get_settings

    sa_url = normalise_url(url or get_settings().db_url)
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = sa.create_engine(sa_url, **kwargs)

        @event.listens_for(engine, "connect")
        def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable with WAL across app crashes
            cur.close()
    else:
        kwargs.setdefault("pool_pre_ping", True)
        if sa_url.get_backend_name() == "postgresql":
            kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", 5)
        engine = sa.create_engine(sa_url, **kwargs)
    _install_error_translation(engine)
    return engine


_engines_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """One engine (one connection pool) per URL per process."""
    from .settings import get_settings

    key = url or get_settings().db_url
    with _engines_lock:
        if key not in _engines:
            _engines[key] = make_engine(key)
        return _engines[key]


@lru_cache(maxsize=16)
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Objects stay readable after commit (``expire_on_commit=False``): web views and
    reports use them after the unit of work is over."""
    from .settings import get_settings

    return _factory(url or get_settings().db_url)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error, always close."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines(close: bool = True) -> None:
    """Forget pooled connections. ``close=False`` after a fork: the child must not close the
    parent's sockets, only stop using them (celery prefork, gunicorn --preload)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        if close:
            _engines.clear()
            _factory.cache_clear()


def _after_fork_in_child() -> None:
    """A fresh lock (another thread may have held the old one at fork time) and fresh pools."""
    global _engines_lock
    _engines_lock = threading.Lock()
    for engine in list(_engines.values()):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_connection(url: str | None = None) -> None:
    """For readiness probes: raises ``DatabaseUnavailable``/``SchemaMissing`` or returns."""
    with get_engine(url).connect() as conn:
        conn.execute(sa.select(sa.func.count()).select_from(ModelVersion.__table__))


# --------------------------------------------------------------------------- migrations

def _alembic_config(url: str | None) -> Config:
    from alembic.config import Config

    from .settings import get_settings

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise DatabaseUnavailable(
            f"Alembic migrations not found at {MIGRATIONS_DIR}; run from a source checkout."
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url or get_settings().db_url
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run on every start (a no-op when current)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    from alembic import command

    command.downgrade(_alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


__all__ = [
    "ACTIVE_JOB_STATUSES",
    "EXPRESSION_INDEXES",
    "MIGRATIONS_DIR",
    "Base",
    "DatabaseUnavailable",
    "JobStatus",
    "ModelVersion",
    "SchemaMissing",
    "TrainingJob",
    "Upload",
    "UploadReject",
    "UploadSource",
    "UploadedClip",
    "VersionStatus",
    "check_connection",
    "current_revision",
    "dispose_engines",
    "downgrade",
    "get_engine",
    "make_engine",
    "normalise_url",
    "session_factory",
    "session_scope",
    "upgrade",
    "utcnow",
]
