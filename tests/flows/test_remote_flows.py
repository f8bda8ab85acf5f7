"""Flows through the remote engine: faults as rows, resume without resending, dry runs, budgets, the ledger.

    .venv/bin/python -m pytest -q tests/flows/test_remote_flows.py

A fake OpenAI-compatible upstream and a fault proxy (tests/fault_proxy.py) stand in for a
server; the same flows against a real `vllm serve` are tests/engines/test_remote_vllm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_proxy import FakeUpstream, FaultProxy
from sqlmodel import select

from flows.configs import GenerateConfig, LabelConfig
from flows.engine_cache import drop_engines
from store.db import session_scope
from store.models import Failure, Judgment, PreferencePair, Response, Run, Spend

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-test-4f9a-NEVER-STORED-77"


@pytest.fixture(autouse=True)
def _engines():
    yield
    drop_engines()


def remote(url: str, **kw) -> dict:
    settings = {"base_url": url + "/v1", "server": "vllm", "tokenizer": "none", "timeout_s": 3.0,
                "backoff_s": 0.02, "max_retries": 3} | kw
    return {"backend": "openai", "settings": settings}


def gen_cfg(url: str, **kw) -> GenerateConfig:
    base = dict(model="m", prompts=["red-team"], limit=6, rounds=1, engine=remote(url),
                runner={"show_progress": False, "chunk_size": 4})
    return GenerateConfig(**(base | kw))


def rows(model=Response) -> list:
    with session_scope() as s:
        return list(s.exec(select(model)))


def test_faults_become_rows_once_and_a_rerun_asks_only_for_the_failures(use_db):
    from flows.common import load_prompts
    from flows.generate import generate_flow

    bad = load_prompts(None, ["red-team"], 6)[2].text.encode()  # its requests always fail at the endpoint
    cycle = ["429", None, "500", None, "slow", None, "drop", None, "malformed", None]
    with FakeUpstream() as up, FaultProxy(up.url, cycle=cycle, slow_s=4.0, always_fail=lambda raw: bad in raw) as px:
        summary = generate_flow(gen_cfg(px.url))
        first = {r.id: r.text for r in rows()}
        assert set(px.faults_sent) == {"429", "500", "slow", "drop", "malformed", "none"}, px.faults_sent
        assert not px.duplicates()  # no reply was asked for twice
        fails = rows(Failure)
        assert len(fails) == 1 and fails[0].stage == "generate.initial" and not fails[0].quarantined
        assert "RemoteUnavailable" in fails[0].error and "after 4 attempts" in fails[0].error
        assert summary["stages"]["generate.initial"]["deferred"] == 1
        assert Counter(r.kind for r in rows()) == {"initial": 5, "critique": 5, "revision": 5}
        spend = rows(Spend)
        assert sum(r.requests for r in spend) == len(px.attempts)  # every distinct request, once
        assert sum(r.failures for r in spend) == 1 and sum(r.retries for r in spend) > 0
        answered = set(px.successes)
    # the endpoint is healthy again: a rerun asks for the failed prompt's chain and nothing else
    with FakeUpstream() as up, FaultProxy(up.url) as px:
        generate_flow(gen_cfg(px.url))
        assert sum(px.attempts.values()) == 3 and not (set(px.successes) & answered)
    after = {r.id: r.text for r in rows()}
    assert len(after) == 18 and all(after[k] == v for k, v in first.items())
    assert rows(Failure) == []


def test_dry_run_counts_pending_work_and_sends_nothing(use_db):
    from flows.generate import generate_flow
    from flows.label import label_flow

    with FakeUpstream() as up, FaultProxy(up.url) as px:
        cfg = gen_cfg(px.url, runner={"show_progress": False, "dry_run": True,
                                      "prices": {"m": {"input": 1.0, "output": 2.0}}})
        s = generate_flow(cfg)
        assert sum(px.attempts.values()) == 0 and rows() == []
        plans = {k: v["dry_run"] for k, v in s["stages"].items()}
        assert [p["pending"] for p in plans.values()] == [6, 6, 6]  # later stages as if earlier ones finished
        assert all(p["requests"] == 6 and p["completion_tokens"] > 0 for p in plans.values())
        assert plans["generate.critique_1"]["prompt_tokens"] > plans["generate.initial"]["prompt_tokens"]
        assert plans["generate.initial"]["cost_usd_at_most"] > 0
        with session_scope() as sess:
            assert [r.status for r in sess.exec(select(Run))] == ["dry-run"]
        # half done: a dry run counts only what is left
        generate_flow(gen_cfg(px.url, limit=3))
        s = generate_flow(cfg)
        assert [v["dry_run"]["pending"] for v in s["stages"].values()] == [3, 3, 3]
        lab = LabelConfig(policy="m", judge="m", prompts=["red-team"], limit=3, samples=2, principles_per_pair=2,
                          engine=remote(px.url), runner={"show_progress": False, "dry_run": True})
        sent = sum(px.attempts.values())
        s = label_flow(lab)
        assert sum(px.attempts.values()) == sent
        plans = {k: v["dry_run"] for k, v in s["stages"].items()}
        assert plans["label.sample"]["pending"] == 6
        assert plans["label.judge"]["pending"] == 3 * 2 * 2 and plans["label.judge"]["requests"] == 24
        assert plans["label.pair"]["model_calls"] is False


def test_budget_stops_cleanly_and_a_rerun_resumes(use_db):
    from flows.generate import generate_flow

    with FakeUpstream() as up, FaultProxy(up.url) as px:
        s = generate_flow(gen_cfg(px.url, runner={"show_progress": False, "chunk_size": 2, "budget": "200"}))
        assert "budget 200 tokens" in s["budget_stopped"]
        spent = sum(r.prompt_tokens + r.completion_tokens for r in rows(Spend))
        assert 0 < spent <= 200
        n = len(rows())
        assert 0 < n < 18 and rows(Failure) == []
        generate_flow(gen_cfg(px.url))  # no budget: finishes what is left
        assert len(rows()) == 18 and not px.duplicates()


def test_a_dollar_budget_needs_prices(use_db):
    from flows.common import UserError
    from flows.generate import generate_flow

    with FakeUpstream() as up:
        with pytest.raises(UserError, match="needs a price table"):
            generate_flow(gen_cfg(up.url, runner={"show_progress": False, "budget": "$1"}))
        with pytest.raises(ValueError, match="budget 'lots'"):
            gen_cfg(up.url, runner={"budget": "lots"})
        s = generate_flow(gen_cfg(up.url, runner={"show_progress": False, "budget": "$0.0002", "chunk_size": 2,
                                                  "prices": {"*": {"input": 1.0, "output": 1.0}}}))
        assert s["budget_stopped"]
        cost = sum(r.cost_usd for r in rows(Spend))
        assert 0 < cost <= 0.0002


def test_a_hosted_judge_beside_a_local_policy(use_db):
    """Policy and judge on different endpoints: the judge a strict hosted-style API (top log-probs,
    no prefix continuation), then one with no log-probs at all (hard labels, marked)."""
    from flows.label import label_flow

    with FakeUpstream(kind="vllm") as pol, FakeUpstream(kind="openai") as hosted, FakeUpstream(kind="generic") as bare:
        base = dict(policy="m", prompts=["red-team"], limit=2, samples=2, principles_per_pair=1,
                    engine=remote(pol.url), runner={"show_progress": False})
        label_flow(LabelConfig(judge="judge-a", judge_engine=remote(hosted.url, server="auto"), **base))
        js = rows(Judgment)
        assert len(js) == 4 and {j.scoring for j in js} == {"top-logprobs"}
        assert all(0.0 < j.prob_x < 1.0 for j in js)
        assert hosted.requests and all(b["model"] == "judge-a" for _, b, _ in hosted.requests)
        assert all(b["model"] == "m" for _, b, _ in pol.requests)
        label_flow(LabelConfig(judge="judge-b", judge_engine=remote(bare.url, server="auto"), **base))
        hard = [j for j in rows(Judgment) if j.judge_model == "judge-b"]
        assert {j.scoring for j in hard} == {"hard"} and {j.prob_x for j in hard} <= {0.0, 1.0}
        pairs = [p for p in rows(PreferencePair) if p.judge_model == "judge-b"]
        assert pairs and all(p.details["scoring"] == ["hard"] for p in pairs)


def test_the_key_is_never_stored_logged_exported_or_reported(sqlite_url, tmp_path, monkeypatch, capfd):
    """The key lives in one environment variable; the database file, every run's config and
    summary, the logs, an exported dataset (card included) and the report never hold it."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CAI_TEST_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    with FakeUpstream() as up:
        sets = ["--set", "engine.backend=openai", "--set", f"engine.settings.base_url={up.url}/v1",
                "--set", "engine.settings.api_key_env=CAI_TEST_API_KEY", "--set", "engine.settings.tokenizer=none"]
        out = []
        for args in (["generate", "--model", "m", "--prompts", "red-team", "--limit", "3", "--rounds", "1", *sets],
                     ["label", "--policy", "m", "--judge", "m", "--prompts", "red-team", "--limit", "3",
                      "--principles-per-pair", "1", *sets],
                     ["export", "--constitution", "harmless", "--out", str(tmp_path / "export"),
                      "--include-ties", "--include-inconsistent"],
                     ["report", "--out", str(tmp_path / "report")],
                     ["status", "--json"]):
            r = runner.invoke(app, args, catch_exceptions=False)
            assert r.exit_code == 0, r.output
            out.append(r.output)
        assert all(h.get("Authorization") == f"Bearer {SECRET}" for _, _, h in up.requests)
    assert SECRET not in "".join(out) + capfd.readouterr().out + capfd.readouterr().err
    db = (tmp_path / "cai.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("cai.db-*") if p.is_file())
    assert SECRET.encode() not in db
    with session_scope() as s:
        runs = list(s.exec(select(Run)))
    assert runs and all(SECRET not in json.dumps([r.config, r.summary], default=str) for r in runs)
    assert any(r.config["engine"]["settings"].get("api_key_env") == "CAI_TEST_API_KEY" for r in runs)
    files = [p for d in ("export", "report") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files)  # the dataset card was written, and is clean
    assert all(SECRET.encode() not in p.read_bytes() for p in files)


def test_status_shows_spend_per_run(use_db):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.generate import generate_flow

    with FakeUpstream() as up:
        generate_flow(gen_cfg(up.url, limit=2, runner={"show_progress": False,
                                                       "prices": {"m": {"input": 2.0, "output": 4.0}}}))
    r = CliRunner().invoke(app, ["status"], catch_exceptions=False)
    assert r.exit_code == 0 and "spend per run" in r.output and "m @ http://127.0.0.1" in r.output
    data = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    spend = data["runs"][0]["spend"]
    assert spend["requests"] == 6 and spend["cost_usd"] > 0
    with session_scope() as s:
        sp = list(s.exec(select(Spend)))
    assert spend["prompt_tokens"] == sum(x.prompt_tokens for x in sp)
    assert spend["cost_usd"] == pytest.approx(sum(2.0 * x.prompt_tokens + 4.0 * x.completion_tokens
                                                  for x in sp) / 1e6)


def test_cli_dry_run_and_budget_options(use_db):
    from typer.testing import CliRunner

    from flows.cli import app

    with FakeUpstream() as up:
        sets = ["--set", "engine.backend=openai", "--set", f"engine.settings.base_url={up.url}/v1",
                "--set", "engine.settings.server=vllm", "--set", "engine.settings.tokenizer=none"]
        r = CliRunner().invoke(app, ["generate", "--model", "m", "--prompts", "red-team", "--limit", "2",
                                     "--rounds", "1", "--dry-run", *sets], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert "dry run: nothing was sent" in r.output and "would send 6 requests" in r.output
        assert up.requests == []
        r = CliRunner().invoke(app, ["generate", "--model", "m", "--prompts", "red-team", "--limit", "2",
                                     "--rounds", "1", "--budget", "30", *sets], catch_exceptions=False)
        assert r.exit_code == 0 and "stopped by the budget" in r.output, r.output
        r = CliRunner().invoke(app, ["label", "--budget", "lots", *sets])
        assert r.exit_code == 2 and "budget 'lots'" in r.output


# --- a killed process, resumed --------------------------------------------------------------------

def _count(url: str, table: str) -> int:
    try:
        eng = sa.create_engine(url)
        with eng.connect() as c:
            return c.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
    except sa.exc.DBAPIError:
        return 0
    finally:
        eng.dispose()


def test_a_killed_remote_run_resumes_without_sending_a_stored_row_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'cai.db'}"
    env = os.environ | {"CAI_DATABASE_URL": url, "PREFECT_HOME": str(tmp_path / "prefect"),
                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "results")}
    with FakeUpstream(delay_s=0.15) as up, FaultProxy(up.url) as px:
        cmd = [sys.executable, "-m", "flows.cli", "generate", "--model", "m", "--prompts", "red-team", "--limit", "12",
               "--rounds", "1", "--chunk-size", "2", "--set", "engine.backend=openai",
               "--set", f"engine.settings.base_url={px.url}/v1", "--set", "engine.settings.server=vllm",
               "--set", "engine.settings.tokenizer=none", "--set", "engine.settings.concurrency=1"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _count(url, "response") < 8:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # a request of the dead process the proxy was still forwarding comes back
        before = _count(url, "response")
        eng = sa.create_engine(url)
        with eng.connect() as c:
            stored = {r[0]: (r[1], json.loads(r[2])) for r in
                      c.execute(sa.text("SELECT id, text, conversation FROM response"))}
        eng.dispose()
        answered_before = set(px.successes)
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        after = _count(url, "response")
        twice = px.duplicates()
        # every reply asked for twice is one the killed run received but had not yet stored
        eng = sa.create_engine(url)
        with eng.connect() as c:
            final = {r[0]: r[1] for r in c.execute(sa.text("SELECT id, text FROM response"))}
        eng.dispose()
    print(f"killed remote run: {before} rows before, {after} after; {len(answered_before)} replies received "
          f"before the kill, {len(twice)} asked for again (the chunk in flight, never stored)")
    assert after == 36 and before >= 8
    assert all(final[k] == text for k, (text, _) in stored.items())
    sent_twice = [json.loads(px.bodies[k][1])["messages"] for k in twice]
    assert not [m for m in sent_twice if m in [conv for _, conv in stored.values()]], "a stored row was asked again"
    assert len(twice) <= 2  # at most the one chunk (2 items, one request each) in flight at the kill
    assert set(twice) <= answered_before


def test_dry_runs_of_contrast_eval_and_redteam_send_nothing(use_db):
    from flows.configs import ContrastConfig, EvalConfig, RedteamConfig
    from flows.contrast import contrast_flow
    from flows.evaluate import eval_flow
    from flows.redteam import redteam_flow
    from store.models import EvalResult, RedteamCandidate

    dry = {"show_progress": False, "dry_run": True}
    with FakeUpstream() as up:
        s = contrast_flow(ContrastConfig(model="m", limit=2, continue_tokens=8, engine=remote(up.url), runner=dry))
        plans = {k: v["dry_run"] for k, v in s["stages"].items()}
        assert plans["contrast.plain"]["pending"] == 4 and plans["contrast.steered"]["pending"] == 4
        s = eval_flow(EvalConfig(model="m", baseline="m0", judge="j", limit=2, principles=2,
                                 engine=remote(up.url), runner=dry))
        plans = {k: v["dry_run"] for k, v in s["stages"].items()}
        assert s["dry_run"] and plans["eval.generate.model"]["pending"] == 4
        assert plans["eval.judge"]["pending"] == 4 and plans["eval.judge"]["requests"] == 4 * 2 * 2 * 2
        s = redteam_flow(RedteamConfig(model="m", per_category=2, categories=["weapons"], engine=remote(up.url),
                                       runner=dry))
        plans = {k: v["dry_run"] for k, v in s["stages"].items()}
        assert plans["redteam.generate_0"]["pending"] >= 2 and "redteam.campaign" in plans
        assert up.requests == []
    assert rows() == [] and rows(EvalResult) == [] and rows(RedteamCandidate) == []
