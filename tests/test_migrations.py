"""store/migrations: an empty database migrates to head on first use, the migrations match the
models (a model change without a migration fails here), and concurrent first use is safe."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import store.models  # noqa: F401  (registers the tables)
from store import db


def _table_names(eng: sa.Engine) -> set[str]:
    return set(sa.inspect(eng).get_table_names()) - {"alembic_version"}


def test_single_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db._alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1, f"several migration heads: {script.get_heads()}"
    assert db.head_revision() == script.get_current_head()


def test_empty_database_migrates_to_head_on_first_use(db_url):
    raw = db.make_engine(db_url)
    assert _table_names(raw) == set() and db.current_revision(raw) is None
    raw.dispose()

    eng = db.get_engine(db_url)
    assert db.current_revision(eng) == db.head_revision()
    insp = sa.inspect(eng)
    assert _table_names(eng) == set(SQLModel.metadata.tables)
    for name, table in SQLModel.metadata.tables.items():
        cols = {c["name"]: c for c in insp.get_columns(name)}
        assert set(cols) == {c.name for c in table.columns}, name
        for c in table.columns:
            assert cols[c.name]["nullable"] == c.nullable, f"{name}.{c.name} nullable"
        pk = insp.get_pk_constraint(name)["constrained_columns"]
        assert set(pk) == {c.name for c in table.primary_key.columns}, name
        fks = {(tuple(fk["constrained_columns"]), fk["referred_table"]) for fk in insp.get_foreign_keys(name)}
        assert fks == {((fk.parent.name,), fk.column.table.name) for fk in table.foreign_keys}, name
        indexes = {i["name"] for i in insp.get_indexes(name)}
        assert {i.name for i in table.indexes} <= indexes, name


def test_migrations_match_models(db_url):
    """autogenerate finds nothing to do: every model change came with a migration."""
    eng = db.get_engine(db_url)
    with eng.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
        diffs = compare_metadata(ctx, SQLModel.metadata)
    assert diffs == [], ("the models and the migrations differ; run `alembic revision --autogenerate` "
                         f"(script_location store/migrations): {diffs}")


def test_the_check_catches_a_model_change_without_migration(sqlite_url):
    """The comparison above is not vacuous: an added column or table shows up."""
    eng = db.get_engine(sqlite_url)
    changed = sa.MetaData()
    for t in SQLModel.metadata.sorted_tables:
        t.to_metadata(changed)
    changed.tables["prompt"].append_column(sa.Column("language", sa.String, nullable=True))
    sa.Table("new_table", changed, sa.Column("id", sa.Integer, primary_key=True))
    with eng.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), changed)
    kinds = {(d[0], getattr(d[-1], "name", None)) for d in diffs if isinstance(d, tuple)}
    assert ("add_column", "language") in kinds and ("add_table", "new_table") in kinds, diffs


def test_upgrade_is_idempotent(db_url):
    eng = db.get_engine(db_url)
    assert db.upgrade(eng) == db.head_revision()
    assert db.upgrade(eng) == db.head_revision()
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_downgrade_to_base_and_back(db_url):
    """The initial migration's downgrade drops everything it created (keeps rollbacks usable)."""
    from alembic import command

    eng = db.get_engine(db_url)
    cfg = db._alembic_config(eng.url.render_as_string(hide_password=False))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert _table_names(eng) == set()
    db.upgrade(eng)
    assert _table_names(eng) == set(SQLModel.metadata.tables)


def test_database_from_a_newer_version_is_a_clear_error(sqlite_url):
    eng = db.get_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d_from_the_future'"))
    db.reset_engines()
    with pytest.raises(db.DatabaseError, match="schema revision 'f00d_from_the_future'.*upgrade cai-factory"):
        db.get_engine(sqlite_url)


def test_unreachable_database_is_a_clear_error():
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nope"
    with pytest.raises(db.DatabaseError) as info:
        db.get_engine(url)
    msg = str(info.value)
    assert "postgresql+psycopg://postgres@127.0.0.1:1/nope" in msg and "CAI_DATABASE_URL" in msg
    assert "\n" not in msg


def test_concurrent_first_use_threads(db_url):
    """Several workers starting at once on an empty database: one migrates, the others wait."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def first_use() -> None:
        try:
            eng = db.make_engine(db_url)  # an engine each, as separate processes would have
            barrier.wait()
            if db.current_revision(eng) != db.head_revision():  # what get_engine does
                db.upgrade(eng)
            eng.dispose()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    eng = db.get_engine(db_url)
    assert db.current_revision(eng) == db.head_revision()
    assert _table_names(eng) == set(SQLModel.metadata.tables)
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
