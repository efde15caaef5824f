"""run_tasks and usage_records: indexes for advancing runs at a cost that does not grow

Revision ID: 0011_run_indexes
Revises: 0007_batch_runs (and needs 0004, which made usage_records)
Create Date: 2026-12-03

An advance of a run counts its current stage's tasks by state and reads only
the pending ones (:mod:`labgate.scheduler.runs`): (stage_id, state) serves
both. Placing a task counts what its owner and their groups hold, their open
usage records: (user_id, stopped_at) and (group_name, stopped_at) find those
without reading every record the owner ever had. A portal of the version
before ignores them.
"""

from __future__ import annotations

from alembic import op

revision = "0011_run_indexes"
down_revision = "0007_batch_runs"
branch_labels = None
depends_on = "0004"  # usage_records


def upgrade() -> None:
    op.create_index("ix_run_tasks_stage_state", "run_tasks", ["stage_id", "state"])
    op.create_index("ix_usage_records_user_open", "usage_records", ["user_id", "stopped_at"])
    op.create_index("ix_usage_records_group_open", "usage_records", ["group_name", "stopped_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_records_group_open", table_name="usage_records")
    op.drop_index("ix_usage_records_user_open", table_name="usage_records")
    op.drop_index("ix_run_tasks_stage_state", table_name="run_tasks")
