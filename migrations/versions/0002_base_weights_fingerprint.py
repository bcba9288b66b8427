"""Value-head versions record the base model's weights fingerprint.

Versions registered before it have none (NULL): they resolve by tokenizer alone, and their head
file's own record (when it has one) is still checked when the head loads.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("value_head_versions") as batch:
        batch.add_column(sa.Column("base_weights_fingerprint", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("value_head_versions") as batch:
        batch.drop_column("base_weights_fingerprint")
