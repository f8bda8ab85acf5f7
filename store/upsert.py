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


def _rows(rows: Iterable[SQLModel | dict[str, Any]], model: type[SQLModel]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if isinstance(row, SQLModel):
            # model_dump would drop defaults computed by default_factory? no: they are set on init.
            out.append({c.name: getattr(row, c.name) for c in model.__table__.columns})
        else:
            out.append(dict(row))
    return out


def insert_ignore(session: Session, model: type[SQLModel], rows: Sequence[SQLModel | dict[str, Any]]) -> int:
    """Insert rows, skipping any whose primary key (or unique key) already exists.

    Returns how many rows were new. Does not commit: callers write a batch in one transaction.
    """
    data = _rows(rows, model)
    if not data:
        return 0
    stmt = _insert_for(session, model).values(data).on_conflict_do_nothing()
    result = session.exec(stmt)  # type: ignore[call-overload]
    return max(result.rowcount or 0, 0)


def upsert(session: Session, model: type[SQLModel], rows: Sequence[SQLModel | dict[str, Any]],
           update: Sequence[str]) -> None:
    """Insert rows, or update the `update` columns where the primary key exists."""
    data = _rows(rows, model)
    if not data:
        return
    pk = [c.name for c in model.__table__.primary_key.columns]
    stmt = _insert_for(session, model).values(data)
    stmt = stmt.on_conflict_do_update(index_elements=pk, set_={c: stmt.excluded[c] for c in update})
    session.exec(stmt)  # type: ignore[call-overload]
