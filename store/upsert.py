"""Dialect upserts: `INSERT ... ON CONFLICT DO NOTHING` on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel


def _insert_for(session: Session, model: type[SQLModel]):
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(model)
    if name == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


def _execute(session: Session, stmt, data: list[dict[str, Any]]):
    # a Core statement on the session's connection skips autoflush: flush objects added with
    # session.add() first, as session.exec() would, so rows may refer to them (foreign keys)
    if session.autoflush:
        session.flush()
    return session.connection().execute(stmt, data)


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
    data = _rows(rows, model)
    if not data:
        return 0
    stmt = _insert_for(session, model).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
    result = _execute(session, stmt, data)
    return max(result.rowcount or 0, 0)


def upsert(session: Session, model: type[SQLModel], rows: Sequence[SQLModel | dict[str, Any]],
           update: Sequence[str]) -> None:
    """Insert rows, or update the `update` columns where the primary key exists (last row wins)."""
    data = _rows(rows, model)
    if not data:
        return
    pk = [c.name for c in model.__table__.primary_key.columns]
    stmt = _insert_for(session, model)
    stmt = stmt.on_conflict_do_update(index_elements=pk, set_={c: stmt.excluded[c] for c in update})
    _execute(session, stmt, data)
