"""The Alembic migrations build the schema the models describe, on Postgres and on SQLite,
and the schema enforces what the application relies on (one active job, one active model)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from src import db, jobs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HEAD = "0002"  # the newest revision in migrations/versions


def table_names(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def index_names(conn: sa.Connection, table: str) -> set[str]:
    if conn.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t"
    else:
        query = "SELECT indexname FROM pg_indexes WHERE tablename = :t"
    return set(conn.execute(sa.text(query), {"t": table}).scalars())


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    db.upgrade(empty_db_url)
    assert set(db.Base.metadata.tables) <= table_names(empty_db_url)
    assert db.current_revision(empty_db_url) == HEAD

    db.downgrade(empty_db_url, "base")
    assert table_names(empty_db_url) & set(db.Base.metadata.tables) == set()
    assert db.current_revision(empty_db_url) is None

    db.upgrade(empty_db_url)
    assert set(db.Base.metadata.tables) <= table_names(empty_db_url)
    db.upgrade(empty_db_url)  # repeating is a no-op, as every start may do it
    assert db.current_revision(empty_db_url) == HEAD


def test_models_and_migrations_agree(db_url: str) -> None:
    """Autogenerate finds nothing to do: the hand-written revision matches ``src.db``."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.get_engine(db_url).connect() as conn, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLite cannot reflect expression indexes
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_object": lambda obj, name, type_, *_: not (
                type_ == "index" and name in db.EXPRESSION_INDEXES),
        })
        diff = compare_metadata(ctx, db.Base.metadata)
        indexes = index_names(conn, "training_jobs")
    assert diff == []
    assert indexes >= db.EXPRESSION_INDEXES


def test_alembic_command_line(empty_db_url: str) -> None:
    """The documented command: ``alembic -x url=... upgrade head`` from the repository root."""
    alembic = [sys.executable, "-m", "alembic", "-x", f"url={empty_db_url}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["upgrade", "head"], ["current"]):
        done = subprocess.run(alembic + args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    assert f"{HEAD} (head)" in done.stdout
    assert set(db.Base.metadata.tables) <= table_names(empty_db_url)


def test_concurrent_upgrades_take_turns(empty_db_url: str) -> None:
    """Web replicas and the worker may all run ``db upgrade`` as they start."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "alembic", "-x", f"url={empty_db_url}",
                               "upgrade", "head"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert db.current_revision(empty_db_url) == HEAD


def test_cli_db_upgrade(empty_db_url: str) -> None:
    from typer.testing import CliRunner

    from src.cli.ops import db_app

    runner = CliRunner()
    result = runner.invoke(db_app, ["upgrade", "--url", empty_db_url])
    assert result.exit_code == 0, result.output
    assert f"revision {HEAD}" in result.output
    result = runner.invoke(db_app, ["downgrade", "base", "--url", empty_db_url])
    assert result.exit_code == 0, result.output
    assert "revision base" in result.output


def test_unreachable_database_is_one_clear_error(closed_port_url: str) -> None:
    with pytest.raises(db.DatabaseUnavailable) as info:
        db.upgrade(closed_port_url)
    message = info.value.message
    assert "Database unavailable" in message and "127.0.0.1" in message
    assert "URBANSOUND_DATABASE_URL" in message

    from typer.testing import CliRunner

    from src.cli.ops import db_app

    result = CliRunner().invoke(db_app, ["upgrade", "--url", closed_port_url])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "error: Database unavailable" in result.output


def test_missing_schema_says_to_migrate(empty_db_url: str) -> None:
    with pytest.raises(db.SchemaMissing, match="urbansound db upgrade"):
        db.check_connection(empty_db_url)


def test_one_active_job(db_url: str) -> None:
    with db.session_scope(db_url) as session:
        first, created = jobs.get_or_create_job(session, {"epochs": 2}, "tester")
        assert created and first.status == "queued"
        again, created = jobs.get_or_create_job(session, {"epochs": 3})
        assert not created and again.id == first.id

    with pytest.raises(sa.exc.IntegrityError), db.session_scope(db_url) as session:
        session.add(db.TrainingJob(status="running"))  # bypassing the helper: the DB refuses

    with db.session_scope(db_url) as session:
        job = session.get(db.TrainingJob, first.id)
        job.status, job.finished_at = "succeeded", db.utcnow()
    with db.session_scope(db_url) as session:
        nxt, created = jobs.get_or_create_job(session)
        assert created and nxt.id != first.id


def test_stale_jobs_are_failed(db_url: str) -> None:
    with db.session_scope(db_url) as session:
        job, _ = jobs.get_or_create_job(session)
        job.status, job.heartbeat_at = "running", datetime(2000, 1, 1, tzinfo=UTC)
    with db.session_scope(db_url) as session:
        assert jobs.sweep_stale_jobs(session) == [job.id]
    with db.session_scope(db_url) as session:
        row = session.get(db.TrainingJob, job.id)
        assert row.status == "failed" and "heartbeat" in row.error
        assert jobs.active_job(session) is None


def test_one_active_model_and_status_values(db_url: str) -> None:
    def version(name: str, status: str) -> db.ModelVersion:
        return db.ModelVersion(version=name, file=f"{name}.pt", sha256="0" * 64, status=status)

    with db.session_scope(db_url) as session:
        session.add_all([version("a", "active"), version("b", "retired"), version("c", "retired")])
    with pytest.raises(sa.exc.IntegrityError), db.session_scope(db_url) as session:
        session.get(db.ModelVersion, "b").status = "active"
    with pytest.raises(sa.exc.IntegrityError), db.session_scope(db_url) as session:
        session.get(db.ModelVersion, "c").status = "bogus"


def test_json_and_timestamps_round_trip(db_url: str) -> None:
    """JSON columns keep nested values; timestamps come back aware and in UTC on both."""
    params = {"epochs": 3, "lr": 3e-4, "folds": [1, 2], "nested": {"a": None, "b": "ü"}}
    with db.session_scope(db_url) as session:
        job = db.TrainingJob(params=params, progress={"epoch": 1, "val_f1": 0.5},
                             started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        session.add(job)
    with db.session_scope(db_url) as session:
        row = session.get(db.TrainingJob, job.id)
        assert row.params == params and row.progress["val_f1"] == 0.5
        assert row.started_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert row.requested_at.tzinfo is not None
        assert abs((db.utcnow() - row.requested_at).total_seconds()) < 120
