"""The remote (OpenAI-compatible) engine against local servers: a fake upstream and a fault proxy.

    .venv/bin/python -m pytest -q tests/engines/test_remote.py

The real `vllm serve` tests are tests/engines/test_remote_vllm.py (the .venv-vllm step of make test).
"""

from __future__ import annotations

import logging
import math
import random
import time

import pytest
from fault_proxy import FakeUpstream, FaultProxy

import engines
from engines import Sampling
from engines.base import HARD_LOGP, metered
from engines.http import backoff_s, endpoint_label, retry_after_s
from engines.remote import (
    BatchIncomplete,
    RemoteSetupError,
    RemoteUnavailable,
    RequestRejected,
    first_answer_scores,
    hard_scores,
)


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


QS = [conv(f"question number {i}: why?") for i in range(12)]


def remote(url: str, **kw):
    kw.setdefault("tokenizer", "none")
    return engines.load("m", engine="openai", base_url=url + "/v1", **kw)


# --- pure pieces ---------------------------------------------------------------------------------

def test_retry_after_and_backoff():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    from email.utils import formatdate

    assert 8 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10
    rng = random.Random(0)
    waits = [backoff_s(a, 1.0, 8.0, rng) for a in range(6)]
    assert all(min(8.0, 2 ** a) / 2 <= w <= min(8.0, 2 ** a) for a, w in enumerate(waits)), waits
    assert waits[-1] <= 8.0


def test_endpoint_label_drops_credentials():
    assert endpoint_label("https://user:secret@api.example.com:8443/v1/?key=abc#x") == "https://api.example.com:8443/v1"


def test_first_answer_scores_reads_the_token_where_choices_part():
    la, lb = math.log(0.6), math.log(0.3)
    content = [{"token": "(", "logprob": -0.1, "top_logprobs": [{"token": "(", "logprob": -0.1}]},
               {"token": "A", "logprob": la, "top_logprobs": [{"token": "A", "logprob": la},
                                                              {"token": "B", "logprob": lb}]}]
    got = first_answer_scores(content, [" (A)", " (B)"])
    assert got == pytest.approx({" (A)": -0.1 + la, " (B)": -0.1 + lb})
    # a bare letter as the first token, and a choice missing from the candidates gets the lowest one
    content = [{"token": "B", "logprob": -0.2, "top_logprobs": [{"token": "B", "logprob": -0.2},
                                                                {"token": " B", "logprob": -2.0},
                                                                {"token": "The", "logprob": -3.0}]}]
    got = first_answer_scores(content, [" (A)", " (B)"])
    assert got[" (B)"] == pytest.approx(math.log(math.exp(-0.2) + math.exp(-2.0)))
    assert got[" (A)"] == -3.0
    # a reply that starts with something else says nothing about the choices
    assert first_answer_scores([{"token": "Well", "logprob": -0.1, "top_logprobs": [
        {"token": "Well", "logprob": -0.1}]}], [" (A)", " (B)"]) is None


def test_hard_scores_parse_the_choice_written():
    assert hard_scores("I think (B) is better", [" (A)", " (B)"]) == {" (A)": HARD_LOGP, " (B)": 0.0}
    assert hard_scores("A. Because", [" (A)", " (B)"]).mode == "hard"
    u = hard_scores("Apples are better", [" (A)", " (B)"])  # "A" inside a word is no answer
    assert u.mode == "unparsed" and set(u.values()) == {HARD_LOGP}
    from cai.judge import prob_a

    assert prob_a(0.0, HARD_LOGP) == 1.0 and prob_a(HARD_LOGP, HARD_LOGP) == 0.5


# --- against the fake upstream -----------------------------------------------------------------

def test_generate_maps_usage_finish_reason_and_n():
    with FakeUpstream(words=6) as up:
        eng = remote(up.url, server="vllm")
        with metered() as m:
            out = eng.generate(QS[:3], Sampling(max_new_tokens=6))
            short = eng.generate(QS[:1], Sampling(max_new_tokens=20, temperature=1.0, n=3, seed=4))[0]
        assert [c.outputs[0].finish_reason for c in out] == ["length"] * 3  # hit max_new_tokens
        assert all(c.outputs[0].completion_tokens == 6 and c.prompt_tokens > 0 for c in out)
        assert [o.finish_reason for o in short.outputs] == ["stop"] * 3
        assert len({o.text for o in short.outputs}) == 3
        sent = [b for p, b, _ in up.requests if p == "/v1/chat/completions" and "seed" in b]
        assert sent[0]["n"] == 3 and sent[0]["repetition_penalty"] == 1.0
        # greedy n > 1 is one request, copied, as the in-process engines do
        g = eng.generate(QS[3:4], Sampling(max_new_tokens=4, n=2))[0]
        assert g.outputs[0].text == g.outputs[1].text and g.outputs[0] is not g.outputs[1]
        usage = m.rows[(eng.endpoint, "m")]
        assert usage.requests == 4 and usage.completion_tokens == 3 * 6 + 18 and usage.failures == 0
        eng.close()


def test_server_ignoring_n_gets_the_rest_one_by_one():
    class NoN(FakeUpstream):
        def chat(self, body):
            return super().chat({**body, "n": 1})

    with NoN() as up:
        eng = remote(up.url, server="vllm")
        c = eng.generate(QS[:1], Sampling(max_new_tokens=6, temperature=1.0, n=3))[0]
        assert len(c.outputs) == 3 and len({o.text for o in c.outputs}) == 3
        eng.close()


def test_probe_finds_what_each_server_kind_supports(caplog):
    caplog.set_level(logging.INFO)
    for kind, scoring in (("vllm", "prompt-logprobs"), ("openai", "top-logprobs"), ("generic", "constrained")):
        with FakeUpstream(kind=kind) as up:
            eng = remote(up.url)
            caps = eng.caps()
            assert caps.server == kind
            assert eng.choice_path() == scoring
            assert f"scores choices by {scoring}" in caplog.text
            eng.close()


def test_choice_logprobs_on_each_path():
    judge_conv = [{"role": "user", "content": "Which is better? Answer with (A) or (B)."},
                  {"role": "assistant", "content": "The answer is:"}]
    with FakeUpstream(kind="vllm") as up:
        eng = remote(up.url)
        row = eng.choice_logprobs([judge_conv], [" (A)", " (B)"])[0]
        assert row.mode == "logprobs" and all(v < 0 for v in row.values())
        # the prompt's tokens came from the server's /tokenize, the choices were appended as their own
        comp = [b for p, b, _ in up.requests if p == "/v1/completions"]
        assert len(comp) == 2 and comp[0]["prompt"][:-3] == comp[1]["prompt"][:-3]
        eng.close()
    with FakeUpstream(kind="openai") as up:
        eng = remote(up.url)
        rows = eng.choice_logprobs([judge_conv, conv("Other. Answer with (A) or (B).")], [" (A)", " (B)"])
        assert [r.mode for r in rows] == ["top-logprobs"] * 2
        p = [math.exp(r[" (A)"]) / (math.exp(r[" (A)"]) + math.exp(r[" (B)"])) for r in rows]
        assert all(0.0 < x < 1.0 for x in p)
        chat = [b for path, b, _ in up.requests if path == "/v1/chat/completions" and b.get("logprobs")]
        assert chat[-2]["messages"][-1]["role"] == "user"  # the answer prefix was dropped, not continued
        assert "continue_final_message" not in chat[-2]
        eng.close()
    with FakeUpstream(kind="generic") as up:
        eng = remote(up.url)
        rows = eng.choice_logprobs([judge_conv], [" (A)", " (B)"])
        assert rows[0].mode == "hard" and sorted(rows[0].values()) == [HARD_LOGP, 0.0]
        eng.close()


def test_assistant_prefix_without_support_is_one_line_naming_the_setting():
    with FakeUpstream(kind="openai") as up:
        eng = remote(up.url)
        with pytest.raises(RemoteSetupError, match="engine.settings.prefix") as e:
            eng.generate([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}]],
                         Sampling(max_new_tokens=4))
        assert "\n" not in str(e.value) and e.value.fatal
        eng.close()
    with FakeUpstream(kind="vllm") as up:
        eng = remote(up.url)
        eng.generate([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}]],
                     Sampling(max_new_tokens=4))
        body = up.requests[-1][1]
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        eng.close()


def test_completions_prefix_path_renders_the_template_here(tiny_model_dir):
    with FakeUpstream(kind="openai") as up:
        eng = remote(up.url, prefix="completions", tokenizer=str(tiny_model_dir))
        c = eng.generate([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}]],
                         Sampling(max_new_tokens=4))[0]
        path, body, _ = up.requests[-1]
        assert path == "/v1/completions" and isinstance(body["prompt"], list) and c.text
        from engines.chat import encode, render

        tok = eng.tokenizer()
        assert body["prompt"] == encode(tok, render(tok, [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Sure,"}]))
        eng.close()


def test_api_key_comes_from_the_named_variable_and_is_never_shown(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CAI_TEST_KEY", "sk-test-NEVER-SHOWN-123")
    with FakeUpstream(kind="vllm") as up:
        eng = remote(up.url, api_key_env="CAI_TEST_KEY")
        eng.generate(QS[:1], Sampling(max_new_tokens=2))
        assert up.requests[-1][2].get("Authorization") == "Bearer sk-test-NEVER-SHOWN-123"
        assert "NEVER-SHOWN" not in repr(eng.stats) + caplog.text
        eng.close()
    monkeypatch.delenv("CAI_TEST_KEY")
    with pytest.raises(ValueError, match="CAI_TEST_KEY, which is not set"):
        remote("http://127.0.0.1:9", api_key_env="CAI_TEST_KEY")
    with pytest.raises(TypeError, match="api_key_env"):
        engines.load("m", engine="openai", base_url="http://x/v1", api_key="sk-1")


def test_a_4xx_is_not_retried():
    with FakeUpstream(kind="openai") as up:
        eng = remote(up.url, server="vllm")  # claims vLLM: the strict server refuses the extras
        with pytest.raises(RequestRejected, match="HTTP 400.*repetition_penalty"):
            eng.generate(QS[:1], Sampling(max_new_tokens=2))
        assert len(up.requests) == 1
        eng.close()


# --- faults ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["429", "500", "slow", "drop", "malformed"])
def test_each_fault_is_retried_until_it_succeeds(fault):
    # a timeout well above a healthy reply's time even on a busy machine: a reply slower than the
    # timeout is asked for again, which the proxy would count as a duplicate
    with FakeUpstream() as up, FaultProxy(up.url, faults={fault: 1.0}, slow_s=4.0, retry_after=1) as px:
        eng = remote(px.url, server="vllm", timeout_s=3.0, backoff_s=0.05, max_retries=3)
        t0 = time.perf_counter()
        with metered() as m:
            out = eng.generate(QS[:4], Sampling(max_new_tokens=4))
        took = time.perf_counter() - t0
        assert len(out) == 4 and all(c.text for c in out)
        assert px.faults_sent[fault] == 4 and not px.duplicates()
        assert m.total.retries == 4 and m.total.requests == 4 and m.total.failures == 0
        if fault == "429":
            assert took >= 1.0  # Retry-After: 1 was honoured
        eng.close()


def test_a_request_that_keeps_failing_raises_and_the_rest_are_not_resent():
    bad = QS[2][0]["content"].encode()
    with FakeUpstream() as up, FaultProxy(up.url, always_fail=lambda raw: bad in raw) as px:
        eng = remote(px.url, server="vllm", backoff_s=0.01, max_retries=2)
        with pytest.raises(BatchIncomplete) as e:
            eng.generate(QS[:5], Sampling(max_new_tokens=4))
        assert e.value.retry_later and "1 of 5 requests failed" in str(e.value)
        sent = sum(px.attempts.values())
        assert sent == 4 + 3  # four good ones, the bad one three times
        # the stage runner's item-by-item retry: answered from memory, nothing sent again
        ok = [eng.generate([q], Sampling(max_new_tokens=4))[0] for q in QS[:2] + QS[3:5]]
        with pytest.raises(RemoteUnavailable, match="after 3 attempts"):
            eng.generate([QS[2]], Sampling(max_new_tokens=4))
        assert sum(px.attempts.values()) == sent and all(c.text for c in ok)
        eng.close()


def test_a_dead_endpoint_fails_fast_after_a_streak():
    eng = remote("http://127.0.0.1:9", server="vllm", backoff_s=0.01, max_retries=1, fail_fast_after=3,
                 concurrency=1)
    with pytest.raises(BatchIncomplete):
        eng.generate(QS[:8], Sampling(max_new_tokens=4))
    assert eng.stats.extra["requests"] == 3  # then "not sent" for the other five
    eng.close()
