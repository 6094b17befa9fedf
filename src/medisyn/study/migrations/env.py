"""Alembic environment: run programmatically by ``medisyn.study.db.migrate`` on its connection."""

from __future__ import annotations

from alembic import context

from medisyn.study.db import VERSION_TABLE, Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the study migrations through medisyn.study.db.migrate (open_db), not the alembic CLI")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
