"""`cai deploy` / `cai submit` on a Prefect work pool with `prefect worker` processes and one PostgreSQL
store: every item computed once, both workers share the work, and a killed worker's items are finished
by the other; `cai status` counts what each worker claimed, wrote and failed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bench.cluster import REPO, Cluster, flow_run_states, progress, submit, wait_completed, wait_for
from flows.cli import app

N = 24  # prompts; generate with one round makes 3 rows per prompt


def test_deploy_checks_settings_flow_and_cron_before_asking_the_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: must not be reached
    runner = CliRunner()
    r = runner.invoke(app, ["deploy", "generate", "--pool", "p", "--set", "limt=3"])
    assert r.exit_code == 2 and "limt: unknown setting" in r.output, r.output
    r = runner.invoke(app, ["deploy", "generate", "--pool", "p", "--set", "rounds=0"])
    assert r.exit_code == 2 and "rounds" in r.output, r.output
    r = runner.invoke(app, ["deploy", "nope", "--pool", "p"])
    assert r.exit_code == 2, r.output
    assert "choose one of generate, contrast, label, redteam, train, reward-train, export, eval, report, run" in (
        r.output)
    r = runner.invoke(app, ["deploy", "generate", "--pool", "p", "--cron", "every day"])
    assert r.exit_code == 2 and "not a valid cron expression" in r.output, r.output
    r = runner.invoke(app, ["deploy", "generate", "--pool", "p"])  # valid: now the server is asked, and is not there
    assert r.exit_code == 2 and "cannot reach the Prefect server" in r.output, r.output
    r = runner.invoke(app, ["submit", "nightly"])
    assert r.exit_code == 2 and "expected FLOW/NAME" in r.output, r.output


def test_stage_runs_count_claimed_done_and_failed_per_worker(sqlite_url, monkeypatch):
    """run_stage's counts, as `cai status` shows them: per Prefect worker (PREFECT__WORKER_NAME) and host."""
    from flows.stage import Stage, run_stage
    from store.db import session_scope
    from store.status import collect

    written: set[str] = set()

    def compute(items):
        return [RuntimeError("bad item") if i == "x3" else i.upper() for i in items]

    stage = Stage("demo", key=lambda i: i, done=lambda _s, keys: {k for k in keys if k in written},
                  compute=compute, write=lambda _s, pairs: written.update(i for i, _ in pairs))
    monkeypatch.setenv("PREFECT__WORKER_NAME", "gpu-box-1")
    run_stage(stage, [f"x{i}" for i in range(5)], worker="h:1:1", run_id="run-a", chunk_size=2, lease_s=60,
              show_progress=False, url=sqlite_url)
    monkeypatch.delenv("PREFECT__WORKER_NAME")
    run_stage(stage, [f"x{i}" for i in range(7)], worker="h:1:1", run_id="run-b", chunk_size=2, lease_s=60,
              show_progress=False, url=sqlite_url)
    with session_scope(sqlite_url) as s:
        workers = {w["worker"]: w for w in collect(s)["workers"]}
    assert set(workers) == {"gpu-box-1", ""}
    a, b = workers["gpu-box-1"], workers[""]
    # run a: x0..x4; x3 fails three times (claimed each time) and is quarantined; run b: only x5, x6
    assert (a["claimed"], a["done"], a["failed"], a["runs"]) == (7, 4, 3, 1)
    assert (b["claimed"], b["done"], b["failed"], b["runs"]) == (2, 2, 0, 1)
    assert a["host"] == b["host"] != ""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = CliRunner().invoke(app, ["status"]).output
    cells = [c.strip() for c in next(ln for ln in out.splitlines() if "gpu-box-1" in ln).split("│")[1:-1]]
    assert cells[0] == "gpu-box-1" and cells[2:7] == ["1", "0", "7", "4", "3"], out  # runs running claimed done failed


def _responses(url: str, run_ids: set[str]) -> list[tuple]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        rows = c.execute(sa.text("SELECT prompt_id, kind, round, run_id FROM response")).all()
    eng.dispose()
    return [tuple(r) for r in rows if r[3] in run_ids]


def _cai_runs(url: str) -> dict[str, str]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        rows = dict(c.execute(sa.text("SELECT id, status FROM run WHERE flow = 'generate'")).all())
    eng.dispose()
    return rows


def _claims(url: str) -> int:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        n = c.execute(sa.text("SELECT count(*) FROM claim")).scalar()
    eng.dispose()
    return n


def _check_once(url: str, run_ids: set[str]) -> dict[str, dict[str, int]]:
    """Every (prompt, stage) has one row, and the runs' own counts add up to the rows: none done twice."""
    rows = _responses(url, run_ids)
    assert Counter((k, r) for _, k, r, _ in rows) == {("initial", 0): N, ("critique", 1): N, ("revision", 1): N}
    assert max(Counter((p, k, r) for p, k, r, _ in rows).values()) == 1
    per_run = progress(url, run_ids)
    assert sum(w["done"] for w in per_run.values()) == len(rows) == 3 * N, per_run
    assert _claims(url) == 0, "finished work leaves no claims behind"
    return per_run


@pytest.mark.prefect_server
@pytest.mark.postgres
def test_two_workers_on_a_work_pool_share_the_work_and_survive_a_killed_worker(tmp_path, pg_url, tiny_model_dir):
    from store.db import get_engine

    get_engine(pg_url)  # the schema first, so the runs start on equal terms
    cluster = Cluster(tmp_path, pg_url, {"CAI_CPU_DTYPE": "float32"})
    t0 = time.monotonic()
    try:
        cluster.start_server()
        tokens = [x for k in ("initial", "critique", "revision") for x in ("--set", f"{k}.max_new_tokens=24")]
        r = cluster.cai("deploy", "generate", "--pool", "cai-test", "--name", "split", "--cron", "0 3 * * *",
                        "--constitution", "harmless", "--prompts", "red-team", "--set", f"model={tiny_model_dir}",
                        "--set", f"limit={N}", "--set", "rounds=1", "--set", "runner.chunk_size=1",
                        "--set", "runner.show_progress=false", *tokens)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(created, type process)" in r.stdout, r.stdout
        import httpx

        pool = httpx.get(f"{cluster.api}/work_pools/cai-test", timeout=10).json()
        assert pool["type"] == "process"
        dep = httpx.get(f"{cluster.api}/deployments/name/generate/split", timeout=10).json()
        assert dep["entrypoint"] == "flows.prefect_flows.generate_flow"
        assert dep["work_pool_name"] == "cai-test" and dep["parameters"]["cfg"]["limit"] == N
        assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 3 * * *"]

        # meanwhile, in one process (the imports are the cost): every other stage flow registers too, and
        # `cai submit` checks its --set against the flow's config and names the deployments it knows
        code = ("import json\nfrom cai.errors import UserError\nfrom pydantic import ValidationError\n"
                "from flows.schedule import deploy, submit\n"
                "extra = {'export': {'constitution': 'harmless', 'out': 'exports/x'}, 'eval': {'model': 'm'}}\n"
                "out = [deploy(f, 'cai-test', extra.get(f, {}), name='other')['deployment']\n"
                "       for f in ('label', 'train', 'export', 'eval', 'run', 'contrast', 'redteam', 'report',\n"
                "                 'reward-train')]\n"
                "for name, over in (('generate/split', {'rounds': 0}), ('generate/nope', {})):\n"
                "    try:\n        submit(name, 1, over)\n        out.append('submitted')\n"
                "    except (UserError, ValidationError) as exc:\n        out.append(str(exc))\n"
                "print(json.dumps(out))\n")
        checks = subprocess.Popen([sys.executable, "-c", code], env=cluster.env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("w1", "w2"):
            cluster.start_worker(name, "cai-test", limit=1)
        out, err = checks.communicate(timeout=180)
        assert checks.returncode == 0, out + err
        *deployed, bad_set, missing = json.loads(out)
        assert deployed == ["label/other", "train/other", "export/other", "eval/other", "pipeline/other",
                            "contrast/other", "redteam/other", "report/other", "reward/other"]
        assert "rounds" in bad_set and "greater than or equal to 1" in bad_set, bad_set
        assert "no deployment 'generate/nope'" in missing and "generate/split" in missing, missing
        wait_for(lambda: {"w1", "w2"} <= cluster.workers_online("cai-test"), 90, "both workers online",
                 lambda: [cluster._check(n) for n in ("w1", "w2")])

        # 1. two runs, two workers: everything once, both runs completed, both workers did some
        ids = submit(cluster, "generate/split", 2)
        assert len(ids) == 2
        states = wait_completed(cluster, ids, 150)
        assert set(states.values()) == {"COMPLETED"}, (states, cluster.log_tail("w1"), cluster.log_tail("w2"))
        first = _cai_runs(pg_url)
        assert len(first) == 2 and set(first.values()) == {"completed"}
        per = _check_once(pg_url, set(first))
        assert set(per) == {"w1", "w2"} and all(w["done"] > 0 for w in per.values()), per
        t1 = time.monotonic()

        # 2. new work (another seed); kill w2 and the run it started mid-way: w1's run finishes it all
        ids = submit(cluster, "generate/split", 2, "seed=7")

        def both_working():
            now = progress(pg_url, set(_cai_runs(pg_url)) - set(first))
            done = sum(w["done"] for w in now.values())
            if done >= 3 * N * 0.7:
                pytest.fail(f"the runs got too far before both were working: {now}")
            return now if all(now.get(w, {}).get("done", 0) > 0 for w in ("w1", "w2")) else None

        wait_for(both_working, 120, "both workers to write rows", poll_s=0.2)
        cluster.kill_worker("w2")
        killed_at = progress(pg_url, set(_cai_runs(pg_url)) - set(first))

        def one_completed():
            states = flow_run_states(cluster.api, ids)
            return states if "COMPLETED" in states.values() else None

        states = wait_for(one_completed, 150, "the surviving run to complete", poll_s=1)
        assert sorted(states.values())[0] == "COMPLETED" and list(states.values()).count("COMPLETED") == 1, states
        second = {k: v for k, v in _cai_runs(pg_url).items() if k not in first}
        assert sorted(second.values()) == ["completed", "running"], second  # the killed run never closed
        per = _check_once(pg_url, set(second))
        assert per["w2"]["done"] == killed_at["w2"]["done"] > 0  # what w2 wrote before dying counts, and stays
        assert per["w1"]["done"] == 3 * N - per["w2"]["done"]

        r = cluster.cai("status", "--json")
        assert r.returncode == 0, r.stderr
        status = {w["worker"]: w for w in json.loads(r.stdout)["workers"]}
        assert status["w1"]["done"] + status["w2"]["done"] == 6 * N
        assert status["w2"]["running"] == 0  # `cai status` marked the killed run crashed (its process is gone)
        print(f"phase 1 (server + workers + 2 runs) {t1 - t0:.0f}s, phase 2 {time.monotonic() - t1:.0f}s; "
              f"w2 had written {killed_at['w2']['done']} rows when killed; per worker {per}")
    finally:
        cluster.stop()
