"""Per-destination objects: a delivery is one object (seg.dcm, rtstruct.dcm, sr.dcm, sc.dcm) to one destination,
so a planning system can get the RTSTRUCT while the PACS gets the SEG, SR and key image, each tracked on its own.
Existing deliveries are SEGs.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The unnamed UNIQUE (job_id, destination) of 0001, by the name each dialect gave it (SQLite: reflected with
# this naming convention; PostgreSQL: <table>_<columns>_key).
NAMING = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _old_unique() -> str:
    return "deliveries_job_id_destination_key" if op.get_bind().dialect.name == "postgresql" \
        else "uq_deliveries_job_id_destination"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", naming_convention=NAMING,
                              table_kwargs={"sqlite_autoincrement": True}) as table:
        table.add_column(sa.Column("object", sa.Text, nullable=False, server_default=sa.text("'seg.dcm'")))
        table.drop_constraint(_old_unique(), type_="unique")
        table.create_unique_constraint("deliveries_job_destination_object", ["job_id", "destination", "object"])


def downgrade() -> None:
    raise NotImplementedError("ctseg does not downgrade: restore the backup taken before the upgrade")
