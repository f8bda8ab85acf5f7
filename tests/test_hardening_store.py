"""Concurrent writers on PostgreSQL: overlapping `cai prompts add` never deadlock or lose rows.

    CAI_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \
        .venv/bin/python -m pytest tests/test_hardening_store.py -m postgres

Two writers of overlapping rows in opposite orders used to take their row locks in opposite
orders: PostgreSQL killed one with DeadlockDetected and its whole file (prompts and tags) was lost.
"""

from __future__ import annotations

import threading

import pytest
from sqlmodel import func, select

from cai.prompts import ParsedPrompt
from store import upsert
from store.db import session_scope
from store.models import Prompt, PromptTag
from store.queries import store_prompts

N = 3000


def parsed(start: int, stop: int) -> list[ParsedPrompt]:
    return [ParsedPrompt([{"role": "user", "content": f"prompt number {i}"}]) for i in range(start, stop)]


def run_together(*jobs) -> list[BaseException]:
    """Run the jobs in threads released at the same instant; the exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def wrap(job):
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def counts(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        tags = dict(s.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag)).all())
        return {"prompts": s.exec(select(func.count()).select_from(Prompt)).one(), **tags}


@pytest.mark.postgres
def test_overlapping_prompt_adds_in_opposite_orders(pg_url: str):
    with session_scope(pg_url) as s:  # rows stored before must all still be there afterwards
        store_prompts(s, parsed(0, 200), "before.txt", ["before"])
    first, second = parsed(100, N), parsed(100, N)[::-1]  # overlapping: the same rows, opposite orders

    def add(rows, tag):
        def job():
            with session_scope(pg_url) as s:
                store_prompts(s, rows, f"{tag}.txt", [tag, "shared"])
        return job

    errors = run_together(add(first, "a"), add(second, "b"))
    assert not errors, errors
    assert counts(pg_url) == {"prompts": N, "before": 200, "a": N - 100, "b": N - 100, "shared": N - 100}


@pytest.mark.postgres
def test_a_deadlock_victim_is_retried(pg_url: str, monkeypatch):
    """Unsorted rows (as a caller bypassing insert_ignore would send) deadlock; the victim reruns
    its statement from a savepoint, and both transactions commit everything."""
    retries: list[float] = []
    sleep = upsert.time.sleep
    monkeypatch.setattr(upsert.time, "sleep", lambda s: (retries.append(s), sleep(s)))
    with session_scope(pg_url):
        pass  # schema
    stmt = upsert._insert_for  # noqa: SLF001 - the statement insert_ignore builds, without its sort

    def insert(rows):
        def job():
            with session_scope(pg_url) as s:
                data = upsert._rows([Prompt(id=p.id, text="t", messages=p.messages) for p in rows], Prompt)
                upsert._execute(s, stmt(s, Prompt).on_conflict_do_nothing(), data)
        return job

    for round_ in range(8):  # a deadlock is likely in each round; stop after the first one retried
        rows = parsed(round_ * N, (round_ + 1) * N)
        assert not run_together(insert(rows), insert(rows[::-1]))
        assert counts(pg_url)["prompts"] == (round_ + 1) * N
        if retries:
            break
    assert retries, "no deadlock happened in 8 rounds: the retry path was not exercised"


@pytest.mark.postgres
def test_a_reply_with_a_nul_byte_or_a_lone_surrogate_is_stored(pg_url: str):
    """The bundled tokenizer's token 190 decodes to NUL, which a random-weight model can emit; PostgreSQL refuses
    NUL (DataError), the error both runs of the two-worker deploy test failed with in one CI run."""
    from fault_proxy import FakeUpstream

    import engines
    from engines import Sampling
    from store.models import Response

    class Odd(FakeUpstream):
        def _text(self, key, max_tokens):
            return "a\x00b\ud800c", "stop"

    with Odd() as up:
        eng = engines.load("m", engine="openai", base_url=up.url + "/v1", tokenizer="none", server="vllm")
        text = eng.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=8))[0].text
        eng.close()
    assert text == "a\ufffdb\ufffdc"
    with session_scope(pg_url) as s:
        store_prompts(s, parsed(0, 1), "t.txt", [])
    with session_scope(pg_url) as s:
        prompt_id = s.exec(select(Prompt.id)).one()
        upsert.insert_ignore(s, Response, [Response(id="r1", prompt_id=prompt_id, kind="initial", conversation=[],
                                                    text=text, model="m")])
    with session_scope(pg_url) as s:
        assert s.exec(select(Response.text)).one() == "a\ufffdb\ufffdc"
