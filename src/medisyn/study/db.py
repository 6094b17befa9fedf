"""The reader study's database: SQLAlchemy 2 models, Alembic migrations, tokens, answers.

One database (SQLite by default, PostgreSQL in the chart) holds any number of studies. What a reader
may learn and what only the study side knows live in separate columns that the reader pages never
select: ``StudyItem.origin`` / ``true_class`` / ``source`` are read by the report and the human
gate only (docs/study.md, "Blinding").

* Schema changes ship as Alembic revisions in ``medisyn/study/migrations`` (package data); every
  :func:`open_db` upgrades the database to the newest revision first, so ``study serve`` on an old
  database migrates it before answering anyone.
* Tokens (one per reader, one admin token per study) are 32 random bytes shown once; only their
  sha256 is stored, and a presented token is compared against the stored hash in constant time.
* An answer is stored the moment it is given, once: ``UNIQUE(reader_id, item_id)``. A second submit
  of the same image (a double click, a resent form) is refused by the database and reported as
  "already answered": the first answer wins and is never changed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DB_URL_ENV = "MEDISYN_STUDY_DB_URL"
DEFAULT_DB_URL = "sqlite:///medisyn-study.db"
MIGRATIONS = Path(__file__).with_name("migrations")
# Alembic's bookkeeping table, named for the study: the chart may put these tables in the database
# MLflow already migrates with Alembic (its own ``alembic_version``), and the two must never mix.
VERSION_TABLE = "medisyn_study_alembic_version"
ORIGINS = ("real", "synthetic")
CONFIDENCE_LEVELS = (1, 2, 3, 4, 5)  # section 4.3.2: 1 to 5, 5 the most confident


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "study"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # random, opaque
    name: Mapped[str] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(100))
    question: Mapped[str] = mapped_column(Text)
    classes_json: Mapped[str] = mapped_column(Text)  # JSON list, in the order the readers see them
    model_name: Mapped[str] = mapped_column(String(400))
    model_version: Mapped[str] = mapped_column(String(40))
    definition_json: Mapped[str] = mapped_column(Text)  # seed, ids, origins, classes, sources (study side only)
    admin_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def classes(self) -> list[str]:
        return list(json.loads(self.classes_json))

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


class StudyItem(Base):
    __tablename__ = "study_item"
    __table_args__ = (UniqueConstraint("study_id", "position"),
                      CheckConstraint("origin IN ('real', 'synthetic')", name="ck_item_origin"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # random, opaque: the only name readers see
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # the shuffled reading order (seeded, recorded)
    origin: Mapped[str] = mapped_column(String(16))  # study side only
    true_class: Mapped[str] = mapped_column(Text)  # study side only
    source: Mapped[str] = mapped_column(Text)  # study side only: real image_hash, or the generation seed
    png: Mapped[bytes] = mapped_column(LargeBinary)  # blinded bytes (medisyn.study.create.blind_png)


class Reader(Base):
    __tablename__ = "study_reader"
    __table_args__ = (UniqueConstraint("study_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))  # e.g. "Attending #1" (Figure 3)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True))


class Answer(Base):
    __tablename__ = "study_answer"
    __table_args__ = (UniqueConstraint("reader_id", "item_id", name="uq_answer_reader_item"),
                      CheckConstraint("confidence BETWEEN 1 AND 5", name="ck_answer_confidence"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("study_reader.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("study_item.id", ondelete="CASCADE"), index=True)
    answer: Mapped[str] = mapped_column(Text)
    confidence: Mapped[int] = mapped_column(Integer)
    answered_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True))


# ----------------------------------------------------------------------------------------------
# Connecting and migrating
# ----------------------------------------------------------------------------------------------
def resolve_db_url(configured: str | None = None) -> str:
    """The database URL: the given one, else ``$MEDISYN_STUDY_DB_URL`` (the chart's Secret), else SQLite here."""
    return configured or os.environ.get(DB_URL_ENV) or DEFAULT_DB_URL


def redact(url: str) -> str:
    """The URL with any password replaced (safe to print, log and store in results)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` with the Alembic scripts shipped in the package."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def open_db(url: str | None = None) -> Engine:
    """An engine on the study database, migrated to the newest schema (once per URL per process)."""
    url = resolve_db_url(url)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                # the threaded server shares the engine across request threads; SQLite serialises writes
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            engine = create_engine(url, **kwargs)
            migrate(engine)
            _ENGINES[url] = engine
        return engine


def dispose_all() -> None:
    """Close every pooled connection (tests, and a server shutting down)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    maker = sessionmaker(engine, expire_on_commit=False)
    with maker() as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------
def new_token() -> str:
    """32 random bytes, URL-safe (43 characters): the secret in a reader's or the admin's link."""
    return secrets.token_urlsafe(32)


def new_id() -> str:
    """An opaque identifier (studies, images): random, never derived from anything about the image."""
    return secrets.token_urlsafe(12)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)


def reader_for_token(s: Session, token: str) -> Reader | None:
    """The reader whose token this is, else None (an unknown or malformed token)."""
    if not token or len(token) > 200:
        return None
    reader = s.scalar(select(Reader).where(Reader.token_hash == hash_token(token)))
    return reader if reader is not None and _token_matches(token, reader.token_hash) else None


def study_for_admin_token(s: Session, token: str) -> Study | None:
    if not token or len(token) > 200:
        return None
    study = s.scalar(select(Study).where(Study.admin_token_hash == hash_token(token)))
    return study if study is not None and _token_matches(token, study.admin_token_hash) else None


class StudyError(ValueError):
    """A study operation that cannot be done as asked (unknown study, closed study, duplicate reader)."""


def get_study(s: Session, study_id: str) -> Study:
    study = s.get(Study, study_id)
    if study is None:
        known = ", ".join(s.scalars(select(Study.id)).all()) or "none"
        raise StudyError(f"no study {study_id!r} in this database (studies: {known})")
    return study


def add_reader(engine: Engine, study_id: str, name: str) -> str:
    """Register a reader on a study; returns their token (shown once: only its hash is stored)."""
    name = name.strip()
    if not name:
        raise StudyError("a reader needs a name (e.g. 'Attending #1')")
    token = new_token()
    try:
        with session(engine) as s:
            study = get_study(s, study_id)
            if study.closed:
                raise StudyError(f"study {study_id} is closed: no new readers")
            s.add(Reader(study_id=study_id, name=name, token_hash=hash_token(token), created_at=utcnow()))
    except IntegrityError:
        raise StudyError(f"study {study_id} already has a reader named {name!r}") from None
    return token


def rotate_admin_token(engine: Engine, study_id: str) -> str:
    """A new admin token for a study (the old one stops working); shown once."""
    token = new_token()
    with session(engine) as s:
        get_study(s, study_id).admin_token_hash = hash_token(token)
    return token


def close_study(engine: Engine, study_id: str) -> _dt.datetime:
    """Close a study: no more answers; the report and the human gate may now read it. Idempotent."""
    with session(engine) as s:
        study = get_study(s, study_id)
        if study.closed_at is None:
            study.closed_at = utcnow()
        assert study.closed_at is not None
        return study.closed_at


# ----------------------------------------------------------------------------------------------
# Reading side: what a reader's pages need, and nothing about origins
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NextItem:
    item_id: str | None  # None when every image is answered
    position: int  # 1-based number of the image shown (or total + 1 when done)
    total: int
    answered: int


def next_item(s: Session, reader: Reader) -> NextItem:
    """The first image in reading order this reader has not answered (resume after a pause)."""
    answered_ids = select(Answer.item_id).where(Answer.reader_id == reader.id)
    total = s.scalar(select(func.count()).select_from(StudyItem).where(StudyItem.study_id == reader.study_id)) or 0
    answered = s.scalar(select(func.count()).select_from(Answer).where(Answer.reader_id == reader.id)) or 0
    item_id = s.scalar(select(StudyItem.id).where(StudyItem.study_id == reader.study_id,
                                                  StudyItem.id.not_in(answered_ids))
                       .order_by(StudyItem.position).limit(1))
    return NextItem(item_id=item_id, position=answered + 1, total=total, answered=answered)


def item_png(s: Session, reader: Reader, item_id: str) -> bytes | None:
    """The blinded PNG of an image of the reader's own study; None for any other id."""
    return s.scalar(select(StudyItem.png).where(StudyItem.id == item_id, StudyItem.study_id == reader.study_id))


def record_answer(engine: Engine, token: str, item_id: str, answer: str, confidence: int) -> bool:
    """Store a reader's answer now; True when stored, False when this image was already answered
    (the first answer wins: a double submit stores once). Raises :class:`StudyError` for an unknown
    token, an image of another study, a class not offered, a confidence outside 1-5, a closed study."""
    if confidence not in CONFIDENCE_LEVELS:
        raise StudyError(f"confidence must be one of {CONFIDENCE_LEVELS}, got {confidence!r}")
    try:
        with session(engine) as s:
            reader = reader_for_token(s, token)
            if reader is None:
                raise StudyError("unknown reader token")
            study = get_study(s, reader.study_id)
            if study.closed:
                raise StudyError("this study is closed")
            if answer not in study.classes:
                raise StudyError("that class is not one of this study's choices")
            in_study = s.scalar(select(StudyItem.id).where(StudyItem.id == item_id,
                                                           StudyItem.study_id == reader.study_id))
            if in_study is None:
                raise StudyError("no such image in this study")
            s.add(Answer(reader_id=reader.id, item_id=item_id, answer=answer, confidence=confidence,
                         answered_at=utcnow()))
    except IntegrityError:
        return False  # UNIQUE(reader_id, item_id): already answered; the first answer stands
    return True


@dataclass(frozen=True)
class ReaderProgress:
    name: str
    answered: int
    total: int
    last_answer_at: _dt.datetime | None


def progress(s: Session, study_id: str) -> list[ReaderProgress]:
    """Answers given per reader (counts only: the admin view never shows answers)."""
    total = s.scalar(select(func.count()).select_from(StudyItem).where(StudyItem.study_id == study_id)) or 0
    rows = s.execute(
        select(Reader.name, func.count(Answer.id), func.max(Answer.answered_at))
        .outerjoin(Answer, Answer.reader_id == Reader.id)
        .where(Reader.study_id == study_id).group_by(Reader.id, Reader.name).order_by(Reader.id)
    ).all()
    return [ReaderProgress(name=n, answered=int(c), total=int(total), last_answer_at=t) for n, c, t in rows]
