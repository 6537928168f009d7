"""indexes for the reads every reaper pass and launch make

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

The ledger sums read only the index (budget, settled_at, cost_usd); open
reservations, runner scopes, pools, recent failures and one VM's events are
found without scanning the history, which grows with every job. Only additions,
as every release's migrations: ix_reservations_budget and ix_jobs_state, now
prefixes of the new ones, go in a later release.
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index('ix_reservations_ledger', ['budget', 'settled_at', 'cost_usd'], unique=False)
        batch_op.create_index('ix_reservations_open', ['settled_at', 'instance_id'], unique=False)
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_pool_state', ['pool', 'state'], unique=False)
        batch_op.create_index('ix_instances_scope', ['runner_scope'], unique=False)
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_instance', ['instance_id', 'kind'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_finished', ['state', 'conclusion', 'completed_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_finished')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_instance')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_scope')
        batch_op.drop_index('ix_instances_pool_state')
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index('ix_reservations_open')
        batch_op.drop_index('ix_reservations_ledger')
