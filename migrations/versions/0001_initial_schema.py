"""Initial schema: uploads, clips, upload_rejects, training_jobs, model_versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Written by hand from ``src.db``'s models (a test checks that they agree on both backends).
Types are portable: strings with CHECK constraints instead of enums, JSON (JSONB on Postgres).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ACTIVE_JOB = "status IN ('queued', 'running')"


def _created(name: str = "created_at") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(),
                     nullable=False)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("parent", sa.String(100), nullable=True),
        _created(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("data_summary", JSON, nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('candidate', 'active', 'rejected', 'retired')",
                           name=op.f("ck_model_versions_status")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_model_versions")),
    )
    op.create_index(op.f("ix_model_versions_created_at"), "model_versions", ["created_at"])
    op.create_index("uq_model_versions_one_active", "model_versions", ["status"], unique=True,
                    postgresql_where=sa.text("status = 'active'"),
                    sqlite_where=sa.text("status = 'active'"))

    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _created("requested_at"),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("celery_task_id", sa.String(255), nullable=True),
        sa.Column("params", JSON, nullable=False),
        sa.Column("progress", JSON, nullable=False),
        sa.Column("base_version", sa.String(100), nullable=True),
        sa.Column("result_version", sa.String(100), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.Column("n_new_clips", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'rejected', 'failed')",
            name=op.f("ck_training_jobs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_jobs")),
    )
    op.create_index(op.f("ix_training_jobs_requested_at"), "training_jobs", ["requested_at"])
    op.create_index(op.f("ix_training_jobs_status"), "training_jobs", ["status"])
    # At most one queued-or-running job: every such row has the same indexed value (true).
    op.create_index("uq_training_jobs_one_active", "training_jobs",
                    [sa.text(f"({ACTIVE_JOB})")], unique=True,
                    postgresql_where=sa.text(ACTIVE_JOB), sqlite_where=sa.text(ACTIVE_JOB))

    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), nullable=False),
        _created(),
        sa.Column("client", sa.String(200), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("n_files", sa.Integer(), nullable=False),
        sa.Column("n_accepted", sa.Integer(), nullable=False),
        sa.Column("n_rejected", sa.Integer(), nullable=False),
        sa.CheckConstraint("source IN ('api', 'ui', 'cli')", name=op.f("ck_uploads_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    op.create_index(op.f("ix_uploads_created_at"), "uploads", ["created_at"])

    op.create_table(
        "clips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("upload_id", sa.Integer(), nullable=False),
        sa.Column("original_name", sa.String(1024), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("used_in_job_id", sa.String(36), nullable=True),
        _created(),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"],
                                name=op.f("fk_clips_upload_id_uploads")),
        sa.ForeignKeyConstraint(["used_in_job_id"], ["training_jobs.id"],
                                name=op.f("fk_clips_used_in_job_id_training_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clips")),
        sa.UniqueConstraint("sha256", name=op.f("uq_clips_sha256")),
    )
    op.create_index(op.f("ix_clips_created_at"), "clips", ["created_at"])
    op.create_index(op.f("ix_clips_label"), "clips", ["label"])
    op.create_index(op.f("ix_clips_upload_id"), "clips", ["upload_id"])
    op.create_index(op.f("ix_clips_used_in_job_id"), "clips", ["used_in_job_id"])

    op.create_table(
        "upload_rejects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("upload_id", sa.Integer(), nullable=False),
        sa.Column("original_name", sa.String(1024), nullable=False),
        sa.Column("reason_code", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        _created(),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"],
                                name=op.f("fk_upload_rejects_upload_id_uploads")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_rejects")),
    )
    op.create_index(op.f("ix_upload_rejects_reason_code"), "upload_rejects", ["reason_code"])
    op.create_index(op.f("ix_upload_rejects_upload_id"), "upload_rejects", ["upload_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes on both backends; children before parents.
    for table in ("upload_rejects", "clips", "uploads", "training_jobs", "model_versions"):
        op.drop_table(table)
