"""Issue 13 item 11: runs and claims survive kills and slow chunks; a copy of cai.db has every row.

- a Run row whose process was killed is marked `crashed` by the next run or `cai status`
- a chunk that computes longer than its claim lease keeps its claims (renewed while computing)
- after `cai export` the SQLite write-ahead log is folded in, so copying cai.db alone loses nothing
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import select

from store import work
from store.db import checkpoint_wal, session_scope
from store.models import Claim, Run
from store.runs import recorded_run, start_run


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _run(url: str, run_id: str) -> Run:
    with session_scope(url) as s:
        return s.get(Run, run_id)


def test_a_killed_run_is_marked_crashed_by_the_next_run(db_url):
    host = socket.gethostname()
    with session_scope(db_url) as s:
        s.add(Run(id="killed", flow="generate", host=f"{host}:{_dead_pid()}", summary={"computed": 3}))
        s.add(Run(id="elsewhere", flow="generate", host="another-machine:1"))  # cannot be checked from here
        s.add(Run(id="old-style", flow="generate", host=host))  # rows from before host:pid
        s.add(Run(id="done", flow="generate", host=f"{host}:{_dead_pid()}", status="completed"))
    with recorded_run("label", {}, url=db_url) as run:
        mine = _run(db_url, run.id)
        assert mine.status == "running" and mine.host == f"{host}:{__import__('os').getpid()}"
    killed = _run(db_url, "killed")
    assert killed.status == "crashed" and killed.finished_at is not None
    assert killed.summary["computed"] == 3 and "ended without closing this run" in killed.summary["error"]
    assert [_run(db_url, i).status for i in ("elsewhere", "old-style", "done", run.id)] == [
        "running", "running", "completed", "completed"]


def test_status_marks_a_killed_run_crashed(db_url, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", db_url)
    live = start_run("generate", {}, url=db_url)  # this process: alive, so left alone
    with session_scope(db_url) as s:
        s.add(Run(id="killed", flow="generate", host=f"{socket.gethostname()}:{_dead_pid()}"))
    r = CliRunner().invoke(app, ["status", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert _run(db_url, "killed").status == "crashed"
    assert _run(db_url, live).status == "running"
    assert '"status": "crashed"' in r.stdout


def test_a_chunk_slower_than_its_lease_keeps_its_claims(db_url, monkeypatch):
    """Another worker tries to take the items while they compute for four leases; it gets none.
    Without the renewal (patched out below) it takes all of them: the test sees the difference."""
    from flows.stage import Stage, run_stage

    def attempt(renew: bool) -> tuple[list[str], int]:
        taken: list[str] = []
        written: dict[str, str] = {}

        def compute(items: list[str]) -> list[str]:
            time.sleep(1.2)  # four leases of 0.3 s
            with session_scope(db_url) as s:
                taken.extend(work.claim(s, f"slow-{renew}", list(items), "other-machine:1:1", lease_s=60))
            return [i.upper() for i in items]

        stage = Stage(name=f"slow-{renew}", key=lambda i: i, done=lambda s, keys: set(written) & set(keys),
                      compute=compute, write=lambda s, pairs: written.update(pairs))
        with monkeypatch.context() as m:
            if not renew:
                m.setattr(work, "renewing", lambda *a, **k: contextlib.nullcontext())
            stats = run_stage(stage, ["a", "b", "c"], worker="this-machine:1:1", run_id=None, chunk_size=3,
                              lease_s=0.3, show_progress=False, url=db_url)
        return taken, stats.computed

    assert attempt(renew=True) == ([], 3)
    with session_scope(db_url) as s:
        assert s.exec(select(Claim)).all() == []  # released with the outputs
    taken, _ = attempt(renew=False)
    assert sorted(taken) == ["a", "b", "c"]


def test_renew_extends_only_this_workers_claims(db_url):
    with session_scope(db_url) as s:
        assert work.claim(s, "st", ["a", "b"], "w1:1:1", lease_s=1) == ["a", "b"]
        assert work.claim(s, "st", ["c"], "w2:1:1", lease_s=1) == ["c"]
        before = {c.item_key: c.expires_at for c in s.exec(select(Claim))}
        assert work.renew(s, "st", ["a", "b", "c"], "w1:1:1", lease_s=600) == 2
        after = {c.item_key: c.expires_at for c in s.exec(select(Claim).execution_options(populate_existing=True))}
    assert after["a"] > before["a"] and after["b"] > before["b"] and after["c"] == before["c"]


def _rows(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT count(*) FROM prompt").fetchone()[0]
    except sqlite3.OperationalError:  # the schema itself can still be in the log
        return -1
    finally:
        con.close()


def test_checkpoint_folds_the_wal_into_the_file(sqlite_url, tmp_path):
    from cai.prompts import ParsedPrompt
    from store.queries import store_prompts

    db = Path(sqlite_url.removeprefix("sqlite:///"))
    with session_scope(sqlite_url) as s:
        store_prompts(s, [ParsedPrompt([{"role": "user", "content": f"q {i}"}]) for i in range(50)], "t", ["t"])
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 0
    shutil.copy(db, tmp_path / "before.db")
    assert _rows(tmp_path / "before.db") != 50  # the copy of the file alone misses the log's rows
    checkpoint_wal(sqlite_url)
    assert wal.stat().st_size == 0
    shutil.copy(db, tmp_path / "after.db")
    assert _rows(tmp_path / "after.db") == 50


def test_export_ends_with_a_checkpoint(sqlite_url, tmp_path, monkeypatch):
    """The export flow checkpoints the log after it closed its Run row."""
    import flows.export

    calls: list[str] = []
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.setattr(flows.export, "build_task", lambda config, run_id, staging: (None, _facts()))
    monkeypatch.setattr(flows.export, "write_task", lambda data, facts, config: {})
    monkeypatch.setattr(flows.export, "checkpoint_wal", lambda url=None: calls.append(_status(sqlite_url)))
    flows.export.export_flow(flows.export.make_config(constitution="harmless", out=tmp_path / "x"))
    assert calls == ["completed"]  # after the Run row was closed


def _facts() -> dict:
    return {"constitution": {"ref": "harmless@0"}, "counts": {"test_sft": 1, "test_prefs": 1},
            "prompts": {"train": 1, "test": 1}}


def _status(url: str) -> str:
    with session_scope(url) as s:
        return s.exec(select(Run.status).where(Run.flow == "export")).one()


@pytest.mark.parametrize("pid_alive", [True, False])
def test_dead_local(pid_alive):
    pid = __import__("os").getppid() if pid_alive else _dead_pid()
    assert work.dead_local(f"{socket.gethostname()}:{pid}:7") is (not pid_alive)
    assert work.dead_local(f"another-machine:{pid}") is False


def test_a_killed_training_run_is_marked_crashed_with_its_run(db_url):
    """A TrainingRun lives as long as its Run: killed mid-training, both are marked by the next run."""
    from store.models import TrainingRun, TrainingStep

    host = socket.gethostname()
    with session_scope(db_url) as s:
        s.add(Run(id="killed", flow="train", host=f"{host}:{_dead_pid()}"))
        s.add(Run(id="elsewhere", flow="train", host="another-machine:1"))
        s.add(Run(id="refused", flow="train", host=f"{host}:1", status="failed"))  # its closing write failed
    with session_scope(db_url) as s:  # the parent rows first: PostgreSQL checks the step's foreign key
        for tid, rid in (("t-killed", "killed"), ("t-elsewhere", "elsewhere"), ("t-refused", "refused")):
            s.add(TrainingRun(id=tid, base_model="b", out_dir="/o", run_id=rid, final_metrics={"steps": 2}))
        s.add(TrainingRun(id="t-done", base_model="b", out_dir="/o", run_id="killed", status="completed"))
    with session_scope(db_url) as s:
        s.add(TrainingStep(training_run_id="t-killed", step=1, split="train", metrics={"loss": 0.6}))
    with recorded_run("train", {}, url=db_url):
        pass
    with session_scope(db_url) as s:
        rows = {r.id: r for r in s.exec(select(TrainingRun))}
        steps = list(s.exec(select(TrainingStep)))
    assert rows["t-killed"].status == "crashed" and rows["t-killed"].finished_at is not None
    assert rows["t-killed"].final_metrics["steps"] == 2 and "ended crashed" in rows["t-killed"].final_metrics["error"]
    assert rows["t-refused"].status == "failed"
    assert rows["t-elsewhere"].status == "running" and rows["t-elsewhere"].finished_at is None  # cannot be checked
    assert rows["t-done"].status == "completed" and "error" not in rows["t-done"].final_metrics
    assert [(st.training_run_id, st.step) for st in steps] == [("t-killed", 1)]  # the steps stored before are kept


def test_status_marks_a_killed_training_run_crashed(sqlite_url, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from store.models import TrainingRun

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    with session_scope(sqlite_url) as s:
        s.add(Run(id="killed", flow="train", host=f"{socket.gethostname()}:{_dead_pid()}"))
    with session_scope(sqlite_url) as s:
        s.add(TrainingRun(id="t", base_model="b", out_dir="/o", run_id="killed"))
    r = CliRunner().invoke(app, ["status", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with session_scope(sqlite_url) as s:
        assert s.get(TrainingRun, "t").status == "crashed"
