"""Dialect upserts: `INSERT ... ON CONFLICT DO NOTHING` on SQLite and PostgreSQL.

Rows are written in primary-key order, so two writers of overlapping rows (two `cai prompts
add` of overlapping files, in any order) take their row locks in the same order and cannot
deadlock each other; a deadlock with some other writer is retried from a savepoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel

DEADLOCK_RETRIES = 5  # PostgreSQL aborts one of two deadlocked statements; it succeeds when rerun


def _insert_for(session: Session, model: type[SQLModel]):
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(model)
    if name == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


def _deadlocked(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "40P01"  # deadlock_detected


def _execute(session: Session, stmt, data: list[dict[str, Any]]):
    # a Core statement on the session's connection skips autoflush: flush objects added with
    # session.add() first, as session.exec() would, so rows may refer to them (foreign keys)
    if session.autoflush:
        session.flush()
    if session.get_bind().dialect.name != "postgresql":
        return session.connection().execute(stmt, data)  # SQLite: one writer at a time, no deadlocks
    for attempt in range(DEADLOCK_RETRIES):
        try:
            # a savepoint: the deadlock victim loses this statement only, not the caller's transaction
            with session.begin_nested():
                return session.connection().execute(stmt, data)
        except OperationalError as exc:
            if not _deadlocked(exc) or attempt == DEADLOCK_RETRIES - 1:
                raise
            time.sleep(random.uniform(0.05, 0.2) * 2**attempt)  # jitter: the two writers must not collide again
    raise AssertionError("unreachable")


def _sorted(data: list[dict[str, Any]], model: type[SQLModel]) -> list[dict[str, Any]]:
    """Rows in primary-key order (stable, so among equal keys the first or last still wins)."""
    pk = [c.name for c in model.__table__.primary_key.columns]
    return sorted(data, key=lambda d: tuple((d.get(k) is None, d.get(k)) for k in pk))


def _rows(rows: Iterable[SQLModel | dict[str, Any]], model: type[SQLModel]) -> list[dict[str, Any]]:
    # An autoincrement key left as None must not be sent: an explicit NULL overrides the
    # PostgreSQL sequence default and violates NOT NULL (SQLite happens to accept it).
    auto = model.__table__.autoincrement_column
    out = []
    for row in rows:
        if isinstance(row, SQLModel):
            d = {c.name: getattr(row, c.name) for c in model.__table__.columns}
        else:
            d = dict(row)
        if auto is not None and d.get(auto.name, 0) is None:
            del d[auto.name]
        out.append(d)
    return out


# Rows go as one executemany of a cached statement (psycopg pipelines it, sqlite3 loops in C),
# not as one multi-row VALUES: that would hit the bind-parameter limits (SQLite 32766,
# PostgreSQL 65535) and is compiled anew for every batch size, which is ~10x slower.
# preserve_rowcount: SQLAlchemy otherwise reads an INSERT's rowcount after closing the cursor,
# and psycopg 3.3 reports -1 by then, so every insert looked like a no-op on PostgreSQL.

def insert_ignore(session: Session, model: type[SQLModel], rows: Sequence[SQLModel | dict[str, Any]]) -> int:
    """Insert rows, skipping any whose primary key (or unique key) already exists.

    Returns how many rows were new. Does not commit: callers write a batch in one transaction.
    """
    data = _sorted(_rows(rows, model), model)
    if not data:
        return 0
    stmt = _insert_for(session, model).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
    result = _execute(session, stmt, data)
    return max(result.rowcount or 0, 0)


def upsert(session: Session, model: type[SQLModel], rows: Sequence[SQLModel | dict[str, Any]],
           update: Sequence[str]) -> None:
    """Insert rows, or update the `update` columns where the primary key exists (last row wins)."""
    data = _sorted(_rows(rows, model), model)
    if not data:
        return
    pk = [c.name for c in model.__table__.primary_key.columns]
    stmt = _insert_for(session, model)
    stmt = stmt.on_conflict_do_update(index_elements=pk, set_={c: stmt.excluded[c] for c in update})
    _execute(session, stmt, data)
