"""Baseline: jobs with claims, leases and typed parameters; the outbox; the arrival buffer with associations and
verified senders (the last schema before Alembic: jobs v2, arrivals v3).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.Float(precision=53)
EMPTY = sa.text("'[]'")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("input_kind", sa.Text),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.Column("progress_done", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("progress_total", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("timings", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("error", sa.Text),
        sa.Column("error_kind", sa.Text),
        sa.Column("notes", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("outputs", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("origin", sa.Text),
        sa.Column("staged", sa.Text),
        sa.Column("destinations", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("outputs_requested", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("series_uid", sa.Text),
        sa.Column("destination_choice", sa.Text, nullable=False, server_default=sa.text("'default'")),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_until", TIME),
        sa.Column("owner", sa.Text),
        sa.Column("superseded_by", sa.Text),
        sa.Column("supersedes", sa.Text),
        sa.Column("seg_seed", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    op.create_index("jobs_state", "jobs", ["state"])
    op.create_index("jobs_lease", "jobs", ["state", "lease_until"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.Column("created", TIME, nullable=False),
        sa.Column("next_attempt", TIME, nullable=False),
        sa.Column("delivered_at", TIME),
        sa.Column("claimed_until", TIME),
        sa.Column("warning", sa.Text),
        sa.Column("claim", sa.Text),
        sa.UniqueConstraint("job_id", "destination"),
        sqlite_autoincrement=True,
    )
    op.create_index("deliveries_due", "deliveries", ["state", "next_attempt"])
    op.create_index("deliveries_destination", "deliveries", ["destination", "state", "next_attempt"])
    op.create_table(
        "incoming",
        sa.Column("series_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("calling_ae_title", sa.Text, nullable=False),
        sa.Column("modality", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("first_received", TIME, nullable=False),
        sa.Column("last_received", TIME, nullable=False),
        sa.Column("aborted", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("routed_instances", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("job_id", sa.Text),
        sa.Column("staging_job", sa.Text),
        sa.Column("staging_instances", sa.Integer),
        sa.Column("routed_at", TIME),
        sa.Column("cut_off_at", TIME),
        sa.Column("sender", sa.Text),
    )
    op.create_table(
        "associations",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("calling_ae_title", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("opened", TIME, nullable=False),
        sa.Column("closed", TIME),
    )
    op.create_index("associations_state", "associations", ["state"])
    op.create_table(
        "arrival_instances",
        sa.Column("series_uid", sa.Text, primary_key=True),
        sa.Column("instance", sa.Text, primary_key=True),
        sa.Column("association_id", sa.Text, nullable=False),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("received", TIME, nullable=False),
    )
    op.create_index("arrival_instances_association", "arrival_instances", ["association_id"])


def downgrade() -> None:
    for table in ("arrival_instances", "associations", "incoming", "deliveries", "jobs"):
        op.drop_table(table)
