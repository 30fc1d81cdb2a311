"""Clip role: an upload trains, or is held out as the gate's test set (no data set installed).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Nullable: existing uploads stay undecided, and an undecided clip trains, as before.
"""

import warnings
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite's batch mode reflects the schema and warns that it cannot reflect the expression
    # index of training_jobs (which this migration does not touch): noise on every first start.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection", sa.exc.SAWarning)
        with op.batch_alter_table("clips") as batch:
            batch.add_column(sa.Column("role", sa.String(8), nullable=True))
            batch.create_check_constraint(op.f("ck_clips_role"), "role IN ('train', 'test')")
            batch.create_index(op.f("ix_clips_role"), ["role"])


def downgrade() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection", sa.exc.SAWarning)
        with op.batch_alter_table("clips") as batch:
            batch.drop_index(op.f("ix_clips_role"))
            batch.drop_constraint(op.f("ck_clips_role"), type_="check")
            batch.drop_column("role")
