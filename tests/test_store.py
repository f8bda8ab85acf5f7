"""store/: content keys, idempotent inserts, upserts, JSON columns, SQLite pragmas, and the
claim/failure scheme of flows/work.py. Every test runs on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from flows.common import worker_id
from store import work
from store.db import database_url, get_engine, make_engine, reset_engines, session_scope
from store.keys import canonical_json, content_hash
from store.models import (
    MAX_ATTEMPTS,
    Claim,
    ConstitutionVersion,
    Failure,
    Prompt,
    PromptTag,
    Response,
    Run,
    utcnow,
)
from store.upsert import insert_ignore, upsert


def _prompt(i: int, **kw) -> Prompt:
    msgs = [{"role": "user", "content": f"prompt {i}"}]
    return Prompt(id=content_hash(msgs, length=24), text=f"prompt {i}", messages=msgs, source="t", **kw)


# --- keys ---------------------------------------------------------------------------------

def test_content_hash_is_canonical():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
    assert content_hash("x", 1) != content_hash("x", "1")
    assert len(content_hash("x")) == 32 and len(content_hash("x", length=12)) == 12
    assert canonical_json({"é": 1, "a": None}) == '{"a":null,"é":1}'


def test_database_url(monkeypatch, tmp_path):
    monkeypatch.delenv("CAI_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert database_url() == f"sqlite:///{tmp_path / 'cai.db'}"  # ./cai.db, pinned to the cwd
    assert database_url("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert database_url("sqlite://") == "sqlite://" and database_url("sqlite:///:memory:") == "sqlite:///:memory:"
    monkeypatch.setenv("CAI_DATABASE_URL", "postgresql://u@h/db")
    assert database_url() == "postgresql+psycopg://u@h/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


# --- inserts and upserts -------------------------------------------------------------------

def test_insert_ignore_rerun_is_a_noop(db_url):
    rows = [_prompt(i) for i in range(5)]
    with session_scope(db_url) as s:
        assert insert_ignore(s, Prompt, rows) == 5
    with session_scope(db_url) as s:
        assert insert_ignore(s, Prompt, rows) == 0
        assert insert_ignore(s, Prompt, rows[:2] + [_prompt(5)]) == 1
        assert insert_ignore(s, Prompt, []) == 0
    with session_scope(db_url) as s:
        assert len(s.exec(select(Prompt)).all()) == 6


def test_insert_ignore_keeps_the_first_row(db_url):
    with session_scope(db_url) as s:
        insert_ignore(s, Prompt, [_prompt(1, category="first")])
        insert_ignore(s, Prompt, [_prompt(1, category="second")])
    with session_scope(db_url) as s:
        assert s.exec(select(Prompt.category)).one() == "first"


def test_insert_ignore_on_unique_key_with_autoincrement_id(db_url):
    """ConstitutionVersion has an autoincrement id and a unique (name, version)."""
    row = dict(name="tiny", version="abcd1234", sha256="abcd1234" + "0" * 56, canonical="{}",
               source_text="name: tiny", source_path="tiny.yaml", principle_hashes={"p": "h"})
    with session_scope(db_url) as s:
        assert insert_ignore(s, ConstitutionVersion, [ConstitutionVersion(**row)]) == 1
        assert insert_ignore(s, ConstitutionVersion, [ConstitutionVersion(**row)]) == 0
        other = ConstitutionVersion(**{**row, "version": "ffff0000"})
        assert insert_ignore(s, ConstitutionVersion, [other]) == 1
    with session_scope(db_url) as s:
        got = s.exec(select(ConstitutionVersion).order_by(ConstitutionVersion.id)).all()
        assert [r.version for r in got] == ["abcd1234", "ffff0000"]
        assert all(isinstance(r.id, int) for r in got)


def test_insert_ignore_sees_rows_added_in_the_same_session(db_url):
    """A pending session.add() is flushed first, so a new row may refer to it by foreign key."""
    p = _prompt(1)
    with session_scope(db_url) as s:
        s.add(p)
        assert insert_ignore(s, PromptTag, [PromptTag(prompt_id=p.id, tag="t")]) == 1
    with session_scope(db_url) as s:
        assert s.exec(select(PromptTag.prompt_id)).all() == [p.id]


def test_insert_ignore_large_batch(db_url):
    """More rows than one statement may carry bind parameters for (SQLite: 32766, PostgreSQL: 65535)."""
    now = utcnow()
    rows = [dict(id=f"p{i}", text="t", messages=[{"role": "user", "content": "t"}], category=None, source="",
                 created_at=now) for i in range(11_000)]  # x 6 columns: over both limits
    with session_scope(db_url) as s:
        assert insert_ignore(s, Prompt, rows) == len(rows)
    with session_scope(db_url) as s:
        assert insert_ignore(s, Prompt, rows) == 0


def test_upsert_updates(db_url):
    with session_scope(db_url) as s:
        upsert(s, Failure, [Failure(stage="gen", item_key="k", error="first", attempts=1)],
               ["error", "attempts"])
    with session_scope(db_url) as s:
        upsert(s, Failure, [Failure(stage="gen", item_key="k", error="second", attempts=2),
                            Failure(stage="gen", item_key="k2", error="other", attempts=1)],
               ["error", "attempts"])
    with session_scope(db_url) as s:
        rows = {f.item_key: f for f in s.exec(select(Failure))}
        assert rows["k"].error == "second" and rows["k"].attempts == 2
        assert rows["k2"].error == "other"


def test_upsert_same_key_twice_in_one_batch(db_url):
    with session_scope(db_url) as s:
        upsert(s, Failure, [Failure(stage="gen", item_key="k", error="a", attempts=1),
                            Failure(stage="gen", item_key="k", error="b", attempts=2)], ["error", "attempts"])
    with session_scope(db_url) as s:
        row = s.get(Failure, ("gen", "k"))
        assert (row.error, row.attempts) == ("b", 2)


def test_json_columns_round_trip(db_url):
    msgs = [{"role": "system", "content": "Be brief. ünïcödé ✓"}, {"role": "user", "content": "hi \"there\""}]
    config = {"nested": {"list": [1, 2.5, None, True], "text": "x"}, "empty": {}, "n": 10**12}
    p = Prompt(id="p1", text="hi", messages=msgs, source="t")
    with session_scope(db_url) as s:
        insert_ignore(s, Prompt, [p])
        s.add(Run(id="r1", flow="generate", config=config, timings={"engine": 1.5}))
        insert_ignore(s, Response, [Response(
            id="resp1", prompt_id="p1", kind="initial", conversation=msgs, text="hello", model="m",
            sampling={"temperature": 0.7, "top_p": 1.0, "stop": ["\n\n"]})])
    with session_scope(db_url) as s:
        assert s.get(Prompt, "p1").messages == msgs
        run = s.get(Run, "r1")
        assert run.config == config and run.timings == {"engine": 1.5}
        assert run.started_at.tzinfo is not None
        r = s.get(Response, "resp1")
        assert r.sampling == {"temperature": 0.7, "top_p": 1.0, "stop": ["\n\n"]}
        assert r.conversation == msgs


def test_foreign_keys_enforced(db_url):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with session_scope(db_url) as s:
            s.add(PromptTag(prompt_id="does-not-exist", tag="t"))


def test_session_scope_rolls_back_on_error(db_url):
    with pytest.raises(RuntimeError):
        with session_scope(db_url) as s:
            insert_ignore(s, Prompt, [_prompt(1)])
            raise RuntimeError("boom")
    with session_scope(db_url) as s:
        assert s.exec(select(Prompt)).all() == []


def test_sqlite_pragmas(sqlite_url):
    eng = get_engine(sqlite_url)
    with eng.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("PRAGMA busy_timeout")).scalar() >= 5000


def test_sqlite_reader_and_writer_share_the_file(sqlite_url):
    """WAL: a reader holding an open transaction does not block a writer."""
    eng = get_engine(sqlite_url)
    other = make_engine(sqlite_url)
    with Session(other) as reader:
        reader.exec(select(Prompt)).all()  # opens a read transaction
        with session_scope(sqlite_url) as s:
            insert_ignore(s, Prompt, [_prompt(1)])
        reader.rollback()
        assert len(reader.exec(select(Prompt)).all()) == 1
    other.dispose()
    eng.dispose()


def test_default_database_is_cai_db_in_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("CAI_DATABASE_URL", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reset_engines()
    try:
        for sub in ("a", "b"):  # a second working directory gets its own, migrated database
            monkeypatch.chdir(tmp_path / sub)
            with session_scope() as s:
                assert insert_ignore(s, Prompt, [_prompt(1)]) == 1
            assert (tmp_path / sub / "cai.db").exists()
    finally:
        reset_engines()


# --- claims and failures (flows/work.py) ---------------------------------------------------

def _claims(url: str, stage: str = "gen") -> dict[str, str]:
    with session_scope(url) as s:
        return {c.item_key: c.worker for c in s.exec(select(Claim).where(Claim.stage == stage))}


def test_two_workers_get_disjoint_claims(db_url):
    keys = [f"k{i}" for i in range(20)]
    get_engine(db_url)
    with session_scope(db_url) as s:
        a = work.claim(s, "gen", keys[:12], "host-a:1:1")
    with session_scope(db_url) as s:
        b = work.claim(s, "gen", keys, "host-b:1:1")
    assert a == keys[:12]
    assert b == keys[12:]
    with session_scope(db_url) as s:
        # claiming again is idempotent for the holder
        assert work.claim(s, "gen", keys, "host-a:1:1") == keys[:12]
        held = s.exec(select(Claim).where(Claim.stage == "gen")).all()
        assert {c.item_key for c in held if c.worker != "host-a:1:1"} == set(keys[12:])
        # another stage is independent
        assert work.claim(s, "label", keys[:3], "host-b:1:1") == keys[:3]


def test_a_claim_commits_no_claim_on_work_another_worker_finished(db_url):
    """A worker can be killed right after `claim` returns: what it committed must be exactly what it
    holds, never a claim on an item whose output is already stored (nobody would ever release it)."""
    get_engine(db_url)
    with session_scope(db_url) as s:  # a dead worker's lapsed claim on an item that was finished since
        assert work.claim(s, "gen", ["d"], "host-b:1:1", lease_s=-1) == ["d"]
    with session_scope(db_url) as s:
        got = work.claim(s, "gen", ["a", "b", "c", "d"], "host-a:1:1", done=lambda ks: {"b", "d"} & set(ks))
    # the worker dies here, before it computes or releases anything
    assert got == ["a", "c"]
    assert _claims(db_url) == {"a": "host-a:1:1", "c": "host-a:1:1"}


def test_concurrent_workers_claim_disjoint_sets(db_url):
    """Four threads race for the same 200 keys; every key ends up with exactly one worker."""
    keys = [f"k{i:03d}" for i in range(200)]
    get_engine(db_url)
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        try:
            barrier.wait()
            got: list[str] = []
            for i in range(0, len(keys), 25):
                with session_scope(db_url) as s:
                    got += work.claim(s, "gen", keys[i:i + 25], name)
            results[name] = got
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"host-{i}:1:1",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    claimed = [k for got in results.values() for k in got]
    assert sorted(claimed) == keys  # all claimed, none twice
    assert _claims(db_url) == {k: w for w, got in results.items() for k in got}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_of_dead_local_process_is_taken_over(db_url):
    get_engine(db_url)
    dead = f"{socket.gethostname()}:{_dead_pid()}:1"
    alive_here = f"{socket.gethostname()}:{os.getppid()}:1"  # our parent: alive
    remote = "some-other-host:1:1"  # cannot be checked from here: only its lease counts
    with session_scope(db_url) as s:
        assert work.claim(s, "gen", ["a"], dead) == ["a"]
        assert work.claim(s, "gen", ["b"], alive_here) == ["b"]
        assert work.claim(s, "gen", ["c"], remote) == ["c"]
    me = worker_id()
    with session_scope(db_url) as s:
        assert work.claim(s, "gen", ["a", "b", "c", "d"], me) == ["a", "d"]
    assert _claims(db_url) == {"a": me, "b": alive_here, "c": remote, "d": me}


def test_expired_lease_is_taken_over(db_url):
    get_engine(db_url)
    with session_scope(db_url) as s:
        assert work.claim(s, "gen", ["a", "b"], "host-a:1:1", lease_s=-1) == ["a", "b"]  # already expired
        assert work.claim(s, "gen", ["c"], "host-a:1:1", lease_s=900) == ["c"]
    with session_scope(db_url) as s:
        assert work.claim(s, "gen", ["a", "b", "c"], "host-b:1:1") == ["a", "b"]
    with session_scope(db_url) as s:
        rows = {c.item_key: c for c in s.exec(select(Claim))}
        assert rows["a"].worker == "host-b:1:1" and rows["a"].expires_at > utcnow() + timedelta(seconds=60)
        assert rows["c"].worker == "host-a:1:1"


def test_release_drops_only_own_claims(db_url):
    get_engine(db_url)
    with session_scope(db_url) as s:
        work.claim(s, "gen", ["a", "b"], "w1")
        work.claim(s, "gen", ["c"], "w2")
    with session_scope(db_url) as s:
        work.release(s, "gen", ["a", "b", "c"], "w1")
    assert _claims(db_url) == {"c": "w2"}


def test_record_failure_quarantines_after_max_attempts(db_url):
    assert MAX_ATTEMPTS == 3
    get_engine(db_url)
    for attempt in range(1, 4):
        with session_scope(db_url) as s:
            n = work.record_failure(s, "gen", "k1", f"ValueError: attempt {attempt}", run_id="r")
            assert n == attempt
        with session_scope(db_url) as s:
            row = s.get(Failure, ("gen", "k1"))
            assert row.attempts == attempt and row.error == f"ValueError: attempt {attempt}"
            assert row.quarantined == (attempt >= 3)
            assert work.quarantined(s, "gen") == ({"k1"} if attempt >= 3 else set())
    with session_scope(db_url) as s:
        work.record_failure(s, "gen", "k2", "x" * 10_000, run_id=None)
        assert len(s.get(Failure, ("gen", "k2")).error) == 4000
    with session_scope(db_url) as s:
        # success clears a retrying item's failure row, never a quarantined one
        work.clear_failures(s, "gen", ["k1", "k2"])
    with session_scope(db_url) as s:
        assert {f.item_key for f in s.exec(select(Failure))} == {"k1"}
        assert work.quarantined(s, "label") == set()


def test_status_counts_pairs_per_principle(db_url):
    """`cai status` says which principle produced how many pairs and how many of them train."""
    from store.models import PreferencePair, Prompt, Response
    from store.status import collect

    with session_scope(db_url) as s:
        s.add(Prompt(id="p", text="q", messages=[{"role": "user", "content": "q"}]))
        for rid in ("r1", "r2"):
            s.add(Response(id=rid, prompt_id="p", kind="initial", conversation=[], text=rid, model="m"))
        s.flush()
        for i, (pids, status) in enumerate([(["weapons"], "ok"), (["weapons"], "gated:not-better"),
                                            (["drugs", "weapons"], "ok"), ([], "tie")]):
            s.add(PreferencePair(id=f"x{i}", prompt_id="p", chosen_id="r1", rejected_id="r2", method="contrastive",
                                 status=status, principle_ids=pids, constitution="harmless", constitution_version="v"))
    with session_scope(db_url) as s:
        rows = {r["principle"]: (r["pairs"], r["ok"], r["kept_out"]) for r in collect(s)["principles"]}
    assert rows == {"weapons": (3, 2, 1), "drugs": (1, 1, 0), "(none recorded)": (1, 0, 1)}


def test_a_run_row_records_its_model_and_engine(sqlite_url):
    """A merge once turned `model=model, engine=engine` into a comment: every Run row lost both."""
    from store.models import Run
    from store.runs import start_run

    run_id = start_run("generate", {"database_url": "postgresql://u:pw@h/db"}, model="smollm2-135m", engine="hf",
                       url=sqlite_url)
    with session_scope(sqlite_url) as s:
        run = s.get(Run, run_id)
        assert (run.model, run.engine) == ("smollm2-135m", "hf")
        assert "pw" not in str(run.config)
