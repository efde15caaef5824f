"""run_tasks: an index on (stage_id, state) for advancing wide stages

Revision ID: 0011_run_task_stage_state
Revises: 0007_batch_runs
Create Date: 2026-12-03

An advance of a run counts its current stage's tasks by state and reads only
the pending ones (:mod:`labgate.scheduler.runs`); this index serves both. A
portal of the version before ignores it.
"""

from __future__ import annotations

from alembic import op

revision = "0011_run_task_stage_state"
down_revision = "0007_batch_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_run_tasks_stage_state", "run_tasks", ["stage_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_run_tasks_stage_state", table_name="run_tasks")
