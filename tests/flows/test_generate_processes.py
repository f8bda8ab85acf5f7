"""Real `cai generate` / `cai label` processes: SIGKILL mid-run then resume; two workers on one PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]


def _cmd(model: Path, limit: int, chunk: int = 2) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "generate", "--model", str(model), "--prompts", "red-team",
            "--limit", str(limit), "--rounds", "2", "--chunk-size", str(chunk), "--max-new-tokens", "24"]


def _env(url: str, tmp: Path) -> dict[str, str]:
    return os.environ | {"CAI_DATABASE_URL": url, "PREFECT_HOME": str(tmp / "prefect"),
                         "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "results")}


def _responses(url: str) -> dict[str, tuple]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        rows = c.execute(sa.text("SELECT id, prompt_id, kind, round, text, created_at, run_id FROM response")).all()
    eng.dispose()
    return {r[0]: tuple(r[1:]) for r in rows}


def _count(url: str, table: str) -> int:
    """Rows in `table`; a database error raises (a 0 here would let "no claims left" pass vacuously)."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return c.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
    finally:
        eng.dispose()


def _count_so_far(url: str, table: str) -> int:
    """For polling a run that is starting: the table may not exist yet, which counts as 0."""
    try:
        return _count(url, table)
    except sa.exc.DBAPIError:
        return 0


def _check_complete(url: str, n_prompts: int) -> dict[str, tuple]:
    rows = _responses(url)
    per_stage = Counter((kind, rnd) for _, kind, rnd, *_ in rows.values())
    assert per_stage == {("initial", 0): n_prompts, ("critique", 1): n_prompts, ("revision", 1): n_prompts,
                         ("critique", 2): n_prompts, ("revision", 2): n_prompts}, per_stage
    # one row per (prompt, stage): nothing was made twice under different keys
    assert max(Counter((p, k, r) for p, k, r, *_ in rows.values()).values()) == 1
    assert _count(url, "preference_pair") == n_prompts
    assert _count(url, "claim") == 0, "finished work leaves no claims behind"
    return rows


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_finishes_without_duplicates(tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'cai.db'}"
    env = _env(url, tmp_path)
    n = 40
    proc = subprocess.Popen(_cmd(tiny_model_dir, n), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _count_so_far(url, "response") < 30:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _responses(url)
    assert 30 <= len(before) < 5 * n

    rerun = subprocess.run(_cmd(tiny_model_dir, n), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _check_complete(url, n)
    # every row finished before the kill is still there, unchanged
    for key, row in before.items():
        assert after[key] == row


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgres_do_every_item_exactly_once(tmp_path, tiny_model_dir, pg_url):
    n = 30
    env = _env(pg_url, tmp_path)
    # create the schema first so the two workers start on equal terms
    from store.db import get_engine

    get_engine(pg_url)
    procs = [subprocess.Popen(_cmd(tiny_model_dir, n, chunk=3), cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    rows = _check_complete(pg_url, n)
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        runs = c.execute(sa.text("SELECT id, summary FROM run WHERE flow = 'generate'")).all()
    eng.dispose()
    assert len(runs) == 2
    computed = {rid: summary["computed"] for rid, summary in runs}
    # the workers' own counts add up to the rows: no item was computed by both
    assert sum(computed.values()) == len(rows) == 5 * n
    by_run = Counter(run_id for *_, run_id in rows.values())
    assert by_run == Counter(computed)
    assert all(v > 0 for v in computed.values()), f"one worker did everything: {computed}"


def _label_cmd(model: Path, limit: int) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "label", "--policy", str(model), "--judge", str(model),
            "--prompts", "red-team", "--limit", str(limit), "--samples", "2", "--principles-per-pair", "2",
            "--max-new-tokens", "8", "--chunk-size", "3"]


def _label_rows(url: str) -> dict[str, list[tuple[str, str | None]]]:
    """(id, run_id) of every row label writes, per table."""
    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = {"sample": c.execute(sa.text("SELECT id, run_id FROM response WHERE kind = 'sample'")).all(),
               "judgment": c.execute(sa.text("SELECT id, run_id FROM judgment")).all(),
               "pair": c.execute(sa.text("SELECT id, run_id FROM preference_pair")).all()}
    eng.dispose()
    return {k: [tuple(r) for r in v] for k, v in out.items()}


def test_count_raises_on_a_database_error(tmp_path):
    with pytest.raises(sa.exc.DBAPIError):
        _count(f"sqlite:///{tmp_path / 'none.db'}", "claim")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_label_workers_on_postgres_do_every_item_exactly_once(tmp_path, tiny_model_dir, pg_url):
    """The label analogue: samples, judgments (both orders, two principles) and pairs, each computed by
    exactly one of two `cai label` processes sharing one PostgreSQL store."""
    n = 20
    env = _env(pg_url, tmp_path)
    from store.db import get_engine

    get_engine(pg_url)
    procs = [subprocess.Popen(_label_cmd(tiny_model_dir, n), cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    rows = _label_rows(pg_url)
    # 2 samples per prompt -> 1 pair, judged under 2 principles in both orders
    assert {k: len(v) for k, v in rows.items()} == {"sample": 2 * n, "judgment": 4 * n, "pair": n}
    for table, got in rows.items():
        assert len({i for i, _ in got}) == len(got), f"{table}: a row written twice"
    assert _count(pg_url, "claim") == 0, "finished work leaves no claims behind"
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        runs = c.execute(sa.text("SELECT id, summary FROM run WHERE flow = 'label'")).all()
    eng.dispose()
    assert len(runs) == 2
    computed = {rid: summary["computed"] for rid, summary in runs}
    every = [run_id for got in rows.values() for _, run_id in got]
    # the workers' own counts add up to the rows, and each row names the run that computed it
    assert sum(computed.values()) == len(every) == 7 * n
    assert Counter(every) == Counter(computed)
    assert all(v > 0 for v in computed.values()), f"one worker did everything: {computed}"
