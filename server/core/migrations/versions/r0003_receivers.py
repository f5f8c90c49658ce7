"""Several DICOM receivers: each association names the receiver that holds it and when it last renewed it, so an
open association of a receiver that died counts as aborted (server/dicomnode/arrivals.py).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as table:
        table.add_column(sa.Column("receiver", sa.Text))
        table.add_column(sa.Column("seen", sa.Float(precision=53)))
    op.create_index("associations_receiver", "associations", ["receiver", "state"])


def downgrade() -> None:
    op.drop_index("associations_receiver", "associations")
    with op.batch_alter_table("associations") as table:
        table.drop_column("seen")
        table.drop_column("receiver")
