"""Alembic migrations of the reader-study database (run by ``medisyn.study.db.open_db``)."""
