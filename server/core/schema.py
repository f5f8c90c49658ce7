"""The job database's tables, as SQLAlchemy Core objects the stores query through (one definition for SQLite and
PostgreSQL). The schema itself is made and changed only by the Alembic revisions in server/core/migrations/;
tests/test_store_contract.py checks that a migrated database and these objects agree.

Times are seconds since the epoch (``Float(53)``: double precision on both), JSON columns are text the stores
encode (portable, and nothing queries inside them).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
TIME = sa.Float(precision=53)
_json_list = sa.text("'[]'")

jobs = sa.Table(
    "jobs", metadata,
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
    sa.Column("notes", sa.Text, nullable=False, server_default=_json_list),
    sa.Column("outputs", sa.Text, nullable=False, server_default=_json_list),
    sa.Column("origin", sa.Text),
    sa.Column("staged", sa.Text),
    sa.Column("destinations", sa.Text, nullable=False, server_default=_json_list),
    sa.Column("outputs_requested", sa.Text, nullable=False, server_default=_json_list),
    sa.Column("series_uid", sa.Text),
    sa.Column("destination_choice", sa.Text, nullable=False, server_default=sa.text("'default'")),
    sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("lease_until", TIME),
    sa.Column("owner", sa.Text),
    sa.Column("superseded_by", sa.Text),
    sa.Column("supersedes", sa.Text),
    sa.Column("seg_seed", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Index("jobs_state", "state"),
    sa.Index("jobs_lease", "state", "lease_until"),
)

deliveries = sa.Table(
    "deliveries", metadata,
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
    sa.Column("object", sa.Text, nullable=False, server_default=sa.text("'seg.dcm'")),  # a ResultFile (0004)
    sa.UniqueConstraint("job_id", "destination", "object", name="deliveries_job_destination_object"),
    sa.Index("deliveries_due", "state", "next_attempt"),
    sa.Index("deliveries_destination", "destination", "state", "next_attempt"),
    sqlite_autoincrement=True,
)

incoming = sa.Table(
    "incoming", metadata,
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

associations = sa.Table(
    "associations", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("calling_ae_title", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("opened", TIME, nullable=False),
    sa.Column("closed", TIME),
    sa.Column("receiver", sa.Text),  # the receiver replica holding it (0003)
    sa.Column("seen", TIME),  # when that receiver last renewed it
    sa.Index("associations_state", "state"),
    sa.Index("associations_receiver", "receiver", "state"),
)

arrival_instances = sa.Table(
    "arrival_instances", metadata,
    sa.Column("series_uid", sa.Text, primary_key=True),
    sa.Column("instance", sa.Text, primary_key=True),
    sa.Column("association_id", sa.Text, nullable=False),
    sa.Column("frames", sa.Integer, nullable=False),
    sa.Column("received", TIME, nullable=False),
    sa.Index("arrival_instances_association", "association_id"),
)
