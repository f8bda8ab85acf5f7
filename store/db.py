"""Database setup: SQLite by default (./cai.db), any SQLAlchemy URL via CAI_DATABASE_URL.

SQLite gets WAL, foreign keys and a busy timeout so a reader and a writer can share it.
Migrations (Alembic) are applied automatically on first use, or with `cai db upgrade`.
A database that holds other tables but no `alembic_version` is refused, never migrated: it is
another application's, or ours with its version table lost. A read-only or locked database, or a
lost server, is a DatabaseError with one line saying what to do; the rows committed before stay.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session, create_engine

DEFAULT_URL = "sqlite:///cai.db"
MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 30.0  # how long a SQLite writer waits for another's lock before giving up


class DatabaseError(RuntimeError):
    """The database cannot be reached or opened; the message says which and how to fix it."""


def database_url(url: str | None = None) -> str:
    url = url or os.environ.get("CAI_DATABASE_URL") or DEFAULT_URL
    # plain postgresql:// means psycopg2 to SQLAlchemy; we ship psycopg 3
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        # a relative file means ./ at first use: pin it, or a cached engine would follow a later
        # chdir to another file that was never migrated (and `cai status` names the real file)
        try:
            u = make_url(url)
        except Exception:  # noqa: BLE001 - reported by get_engine with the URL as given
            return url
        if u.database and u.database != ":memory:" and not u.database.startswith("file:") \
                and not os.path.isabs(u.database):
            url = u.set(database=os.path.abspath(u.database)).render_as_string(hide_password=False)
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    # WAL is a property of the file and persists: set it once. Switching to it needs an
    # exclusive lock and fails at once with "database is locked" (no busy wait) while another
    # connection is opening the same new file, so several workers' first use retry briefly.
    for attempt in range(100):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str | None = None) -> Engine:
    url = database_url(url)
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
        event.listen(eng, "connect", _sqlite_pragmas)
    else:
        eng = create_engine(url, pool_pre_ping=True)
    return eng


def _alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def current_revision(eng: Engine) -> str | None:
    with eng.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(eng: Engine) -> str:
    """Apply pending migrations; safe to call from several processes at once."""
    from alembic import command

    cfg = _alembic_config(eng.url.render_as_string(hide_password=False))
    with eng.begin() as conn:
        if eng.dialect.name == "postgresql":
            # one migrator at a time across workers; released at commit
            conn.execute(text("SELECT pg_advisory_xact_lock(715517)"))
        elif eng.dialect.name == "sqlite":
            # sqlite3 runs DDL outside any transaction unless one is open, so two first uses at
            # once both saw no tables and one died on "table ... already exists". Take the write
            # lock first: the other waits (busy timeout), then finds the schema at head.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head_revision()


def write_lock(session: Session, name: str) -> None:
    """Serialise the writers of `name` until this transaction ends, so what one reads and then writes
    no other changes in between: a transaction-scoped advisory lock on PostgreSQL; on SQLite the
    database's write lock (BEGIN IMMEDIATE), unless this transaction already holds it."""
    import hashlib

    conn = session.connection()
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    elif conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits (busy timeout) for another writer's commit


def shown_url(url: str) -> str:
    """The URL as it may be printed or logged: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: show it as given
        return url


_shown = shown_url

# user:password@ inside a longer text (an error message, a log line): the password part
_EMBEDDED = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)(?P<pw>[^\s@/]+)(?P<at>@)")


def mask_secrets(value: Any) -> Any:
    """`value` (a config, a summary: dicts, lists, strings) with every URL's password masked, as it
    may be stored, logged, exported or sent to Prefect. The one rule: `cai` keeps no credentials."""
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    if isinstance(value, str) and "://" in value and "@" in value:
        try:
            u = make_url(value)
        except Exception:  # noqa: BLE001 - not a URL by itself: look for one inside
            u = None
        if u is not None and u.password:
            return u.render_as_string(hide_password=True)
        return _EMBEDDED.sub(lambda m: m["head"] + "***" + m["at"], value)
    return value


def has_secret(value: Any) -> bool:
    """Does `value` hold a URL with a password (what `mask_secrets` would change)?"""
    return mask_secrets(value) != value


def _our_tables() -> set[str]:
    from sqlmodel import SQLModel

    import store.models  # noqa: F401 - registers the tables

    return set(SQLModel.metadata.tables)


def _refuse_unversioned(url: str, names: set[str]) -> None:
    """A non-empty database without alembic_version is not ours to migrate: say whose it looks like."""
    ours = sorted(names & _our_tables())
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    if ours:
        raise DatabaseError(
            f"the database {_shown(url)} has cai-factory tables ({', '.join(ours[:5])}"
            f"{', ...' if len(ours) > 5 else ''}) but no alembic_version table, so its schema version is unknown "
            "and migrating it could fail halfway; nothing was changed: restore it from a copy that has "
            "alembic_version, or point CAI_DATABASE_URL at a new database")
    raise DatabaseError(
        f"the database {_shown(url)} belongs to another application: it holds tables ({shown}) and none of "
        "cai-factory's; nothing was changed: point CAI_DATABASE_URL at a new database (default ./cai.db)")


def explain(exc: BaseException, url: str) -> DatabaseError | None:
    """A one-line DatabaseError for a database that refuses work (read-only, locked, full, gone), or None."""
    if not isinstance(exc, DBAPIError) or isinstance(exc, IntegrityError):
        return None
    orig = exc.orig
    detail = (str(orig).strip().splitlines() or [""])[0]
    low = detail.lower()
    name = type(orig).__name__
    where = _shown(url)
    kept = "the rows stored before are kept"
    if "readonly" in low or "read-only" in low or name in ("ReadOnlySqlTransaction", "InsufficientPrivilege"):
        return DatabaseError(f"the database {where} is read-only ({detail}); {kept}, nothing more was written: "
                             "make the file and its directory writable, or point CAI_DATABASE_URL at a writable copy")
    if "database is locked" in low or "database table is locked" in low or name == "LockNotAvailable":
        return DatabaseError(f"the database {where} stayed locked by another process for more than the "
                             f"{BUSY_TIMEOUT_S:g} s busy timeout ({detail}); {kept}: rerun when the other writer "
                             "is done (several workers at once want PostgreSQL)")
    if "disk is full" in low or name == "DiskFull":
        return DatabaseError(f"the database {where} cannot grow: the disk is full ({detail}); {kept}: free space, "
                             "then rerun")
    if isinstance(exc, OperationalError):
        return DatabaseError(f"the database {where} failed: {name}: {detail}; {kept}: check that the file or server "
                             "is reachable and rerun")
    return None


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_alembic_config("sqlite://")).walk_revisions()}


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    try:
        eng = make_engine(url)  # a malformed URL or an unknown driver fails here
        with eng.connect() as conn:
            # one query: a migration in progress elsewhere creates alembic_version with the tables
            names = set(inspect(conn).get_table_names())
            rev = (conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                   if "alembic_version" in names else None)
    except Exception as exc:  # noqa: BLE001 - turned into a message a person can act on
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise DatabaseError(
            f"cannot open the database {_shown(url)}: {exc.__class__.__name__}: {detail}. "
            "Check CAI_DATABASE_URL (e.g. postgresql+psycopg://user@host:5432/db) and that the server is up."
        ) from exc
    if rev is not None and rev not in _known_revisions():
        raise DatabaseError(f"the database {_shown(url)} is at schema revision {rev!r}, which this version "
                            "of cai-factory does not know (a newer version migrated it); upgrade cai-factory")
    if rev is None and names:
        _refuse_unversioned(url, names)
    if rev != head_revision():
        try:
            upgrade(eng)
        except Exception as exc:
            why = explain(exc, url)
            if why is None:
                raise
            raise why from exc
    return eng


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (or CAI_DATABASE_URL, or ./cai.db), migrated to the latest schema."""
    return _engine_for(database_url(url))


def reset_engines() -> None:
    """Forget cached engines (tests switch databases between cases)."""
    _engine_for.cache_clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    eng = get_engine(url)
    with Session(eng, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException as exc:
            session.rollback()
            why = explain(exc, eng.url.render_as_string(hide_password=False))
            if why is not None:
                raise why from exc
            raise


def checkpoint_wal(url: str | None = None) -> None:
    """Fold SQLite's write-ahead log into the database file, so copying cai.db alone copies every row.

    Readers still open elsewhere can keep part of the log; `cai export` calls this at its end anyway.
    """
    eng = get_engine(url)
    if eng.dialect.name != "sqlite":
        return
    with eng.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
