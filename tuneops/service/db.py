"""The jobs API's durable records: API tokens (hashed), files, fine-tuning jobs and their
events, in a real database through SQLAlchemy (SQLite by default, PostgreSQL by URL).

Everything the API answers with comes from here or from Prefect/MLflow, so the API
process can stop and start at any time without losing a job.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (JSON, Boolean, Column, Integer, MetaData, String, Table, Text, create_engine, event,
                        insert, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

tokens = Table(
    "tokens", metadata,
    Column("name", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),   # the token itself is never stored
    Column("created_at", Integer, nullable=False),
)

files = Table(
    "files", metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("filename", String(255), nullable=False),            # the client's name: metadata only, never a path
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_details", Text),
    Column("md5", String(32), nullable=False),
    Column("records", Integer, nullable=False, default=0),
    Column("deleted", Boolean, nullable=False, default=False),
)

jobs = Table(
    "jobs", metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("model", String(64), nullable=False),
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40)),
    Column("hyperparameters", JSON, nullable=False),
    Column("suffix", String(64)),
    Column("seed", Integer, nullable=False),
    Column("job_metadata", JSON),
    Column("status", String(24), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("started_at", Integer),
    Column("finished_at", Integer),
    Column("fine_tuned_model", String(200)),
    Column("model_version", String(16)),
    Column("flow_run_id", String(40)),
    Column("error", JSON),
    Column("trained_tokens", Integer),
    Column("total_steps", Integer, nullable=False),
    Column("estimated_finish", Integer),
    Column("result_files", JSON, nullable=False, default=list),
)

events = Table(
    "events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("job_id", String(40), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
    Column("type", String(16), nullable=False),
    Column("data", JSON),
)

TOKEN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")   # API token names (full match: no trailing newline)

TERMINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    """A server-chosen id: ``prefix-`` + 24 random hex digits (never derived from user input)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> int:
    return int(time.time())


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'service' / 'service.db'}"


def _masked(url: str) -> str:
    """``url`` as an error may show it: no password."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)[:200]


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")      # readers do not block the writer (API + sync loop)
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """Typed access to the service tables; every method is one short transaction."""

    def __init__(self, url: str):
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

        from tuneops.errors import InvalidInput, TuneopsError

        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        shown = f"service.database_url {_masked(url)!r}"
        try:
            self.engine: Engine = create_engine(url, future=True)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise InvalidInput(f"{shown}: not a database URL SQLAlchemy knows ({str(exc).splitlines()[0]}); "
                               f"expected e.g. sqlite:////abs/path.db or postgresql+psycopg2://USER@HOST/DB") from None
        except ImportError as exc:
            raise InvalidInput(f"{shown}: its database driver is not installed ({exc}); install "
                               f"that module here, or name an installed driver (postgresql+DRIVER://...)") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise TuneopsError(f"{shown}: cannot open the database: {str(exc).splitlines()[0][:300]}") from None

    # -- tokens -------------------------------------------------------------------------------
    def create_token(self, name: str) -> str:
        if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
            raise ValueError("a token name is 1-64 characters of A-Z a-z 0-9 _ -")
        token = "tuneops-" + secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            try:
                c.execute(insert(tokens).values(name=name, sha256=token_hash(token), created_at=now()))
            except IntegrityError:
                raise ValueError(f"a token named {name!r} exists (revoke it first)") from None
        return token

    def revoke_token(self, name: str) -> bool:
        with self.engine.begin() as c:
            return c.execute(tokens.delete().where(tokens.c.name == name)).rowcount > 0

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [{"name": r.name, "created_at": r.created_at} for r in c.execute(select(tokens))]

    def owner_of(self, token: str) -> str | None:
        with self.engine.connect() as c:
            row = c.execute(select(tokens.c.name).where(tokens.c.sha256 == token_hash(token))).first()
        return row.name if row else None

    # -- files --------------------------------------------------------------------------------
    def add_file(self, **values: Any) -> dict[str, Any]:
        with self.engine.begin() as c:
            c.execute(insert(files).values(**values))
        return self.get_file(values["owner"], values["id"])  # type: ignore[return-value]

    def get_file(self, owner: str, file_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(files).where(files.c.id == file_id, files.c.owner == owner,
                                                files.c.deleted.is_(False))).mappings().first()
        return dict(row) if row else None

    def list_files(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        q = select(files).where(files.c.owner == owner, files.c.deleted.is_(False))
        if purpose:
            q = q.where(files.c.purpose == purpose)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q.order_by(files.c.created_at.desc(), files.c.id)).mappings()]

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self.engine.begin() as c:
            return c.execute(update(files).where(files.c.id == file_id, files.c.owner == owner,
                                                 files.c.deleted.is_(False)).values(deleted=True)).rowcount > 0

    # -- jobs ---------------------------------------------------------------------------------
    def add_job(self, **values: Any) -> dict[str, Any]:
        with self.engine.begin() as c:
            c.execute(insert(jobs).values(**values))
        return self.job(values["id"])  # type: ignore[return-value]

    def job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        q = select(jobs).where(jobs.c.id == job_id)
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.engine.connect() as c:
            row = c.execute(q).mappings().first()
        return dict(row) if row else None

    def list_jobs(self, owner: str) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(jobs).where(jobs.c.owner == owner)
                                               .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())).mappings()]

    def active_jobs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(jobs).where(jobs.c.status.not_in(TERMINAL))).mappings()]

    def update_job(self, job_id: str, only_if_active: bool = True, **values: Any) -> bool:
        """Update a job; by default never a finished one (a terminal status is final)."""
        q = update(jobs).where(jobs.c.id == job_id)
        if only_if_active:
            q = q.where(jobs.c.status.not_in(TERMINAL))
        with self.engine.begin() as c:
            return c.execute(q.values(**values)).rowcount > 0

    # -- events -------------------------------------------------------------------------------
    def add_event(self, job_id: str, key: str, message: str, created_at: int | None = None, level: str = "info",
                  type: str = "message", data: dict[str, Any] | None = None) -> bool:
        """Record an event once: its id derives from (job, key), so a re-sync adds nothing."""
        event_id = "ftevent-" + hashlib.sha256(f"{job_id}/{key}".encode()).hexdigest()[:24]
        with self.engine.begin() as c:
            if c.execute(select(events.c.seq).where(events.c.id == event_id)).first():
                return False
            try:
                c.execute(insert(events).values(id=event_id, job_id=job_id, created_at=created_at or now(),
                                                level=level, message=message, type=type, data=data))
            except IntegrityError:
                return False
        return True

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Newest first (the order the OpenAI API lists them in)."""
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(events).where(events.c.job_id == job_id)
                                               .order_by(events.c.created_at.desc(), events.c.seq.desc()))
                    .mappings()]


def page(items: list[dict[str, Any]], after: str | None, limit: int, key: str = "id") -> tuple[list[Any], bool]:
    """Cursor pagination as the OpenAI API does it: the items after the one with id ``after``."""
    if after:
        ids = [i[key] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


def iter_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk
