"""The reader study's first schema: studies, their blinded images, readers (hashed tokens), answers.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("task", sa.String(100), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("classes_json", sa.Text(), nullable=False),
        sa.Column("model_name", sa.String(400), nullable=False),
        sa.Column("model_version", sa.String(40), nullable=False),
        sa.Column("definition_json", sa.Text(), nullable=False),
        sa.Column("admin_token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "study_item",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("study.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("true_class", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint("study_id", "position"),
        sa.CheckConstraint("origin IN ('real', 'synthetic')", name="ck_item_origin"),
    )
    op.create_index("ix_study_item_study_id", "study_item", ["study_id"])
    op.create_table(
        "study_reader",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("study.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_id", "name"),
    )
    op.create_index("ix_study_reader_study_id", "study_reader", ["study_id"])
    op.create_table(
        "study_answer",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("reader_id", sa.Integer(), sa.ForeignKey("study_reader.id", ondelete="CASCADE"), nullable=False),
        sa.Column("item_id", sa.String(64), sa.ForeignKey("study_item.id", ondelete="CASCADE"), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Integer(), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("reader_id", "item_id", name="uq_answer_reader_item"),
        sa.CheckConstraint("confidence BETWEEN 1 AND 5", name="ck_answer_confidence"),
    )
    op.create_index("ix_study_answer_reader_id", "study_answer", ["reader_id"])
    op.create_index("ix_study_answer_item_id", "study_answer", ["item_id"])


def downgrade() -> None:
    op.drop_table("study_answer")
    op.drop_table("study_reader")
    op.drop_table("study_item")
    op.drop_table("study")
