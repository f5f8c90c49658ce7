"""procrastinate's schema (the queue of several machines, server/jobs/shared_queue.py), on PostgreSQL only.

The SQL is procrastinate's own (``SchemaManager.get_schema()`` of the pinned release, 3.10), applied with the rest
of the database so one ``ctseg db upgrade`` makes all of it; a later procrastinate release's migrations come as
later revisions. SQLite (the single box) has no shared queue: nothing to do there.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    from procrastinate.schema import SchemaManager

    # procrastinate's SQL holds functions with $$ bodies and % signs: run it as one driver-level statement, without
    # parameter parsing (psycopg's execute with no parameters).
    bind.connection.driver_connection.execute(SchemaManager.get_schema())


def downgrade() -> None:
    raise NotImplementedError("ctseg does not downgrade the queue's schema: restore the backup taken before the upgrade")
