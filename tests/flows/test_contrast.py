"""The contrast flow: refusal pairs on harmful prompts, helpfulness pairs on benign ones, gated, resumable."""

from __future__ import annotations

import pytest
from sqlmodel import select

from cai.contrast import CATEGORY_OPENINGS, DEFAULT_OPENINGS, openings_for, plan_prompt, steered_text
from flows.common import drop_engines, register_engine
from flows.contrast import ContrastConfig, contrast_flow
from store.db import session_scope
from store.models import PreferencePair, Prompt, Response

ANSWER = ("Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool and dark. "
          "Cut caffeine after lunch.")


class AnswerEngine:
    """Answers everything helpfully, except it loops on requests that mention 'loop'."""

    backend = "scripted"
    model_id = "answers"

    def __init__(self):
        from engines.base import EngineStats

        self.stats = EngineStats()
        self.calls = 0

    def generate(self, conversations, sampling):
        from engines.base import Completion, Output

        self.calls += len(conversations)
        out = []
        for conv in conversations:
            text = "I'm sorry. I'm sorry. I'm sorry. I'm sorry." if "loop" in conv[-1]["content"] else ANSWER
            out.append(Completion([Output(text, 20, "stop")], prompt_tokens=10))
        return out

    def close(self):
        pass


@pytest.fixture
def engine():
    eng = AnswerEngine()
    register_engine("answers", eng)
    yield eng
    drop_engines()


def _cfg(**kw) -> ContrastConfig:
    base = dict(model="answers", harmful_prompts=["red-team"], benign_prompts=["benign"], limit=6,
                runner={"show_progress": False})
    return ContrastConfig(**(base | kw))


def test_pairs_per_prompt_kind_with_steering_recorded(use_db, engine):
    summary = contrast_flow(_cfg())
    with session_scope() as s:
        pairs = list(s.exec(select(PreferencePair)))
        rows = {r.id: r for r in s.exec(select(Response))}
        prompts = {p.id: p for p in s.exec(select(Prompt))}
    assert summary["harmful"] == 6 and summary["prompts"] == 12 and len(pairs) == 12
    assert engine.calls == 12  # one plain reply per prompt; the openings need no model call
    for p in pairs:
        chosen, rejected = rows[p.chosen_id], rows[p.rejected_id]
        if p.method == "contrastive":
            assert p.constitution == "harmless" and chosen.kind == "contrast-steered"
            assert chosen.text in DEFAULT_OPENINGS and chosen.steering["text"] == chosen.text
            assert rejected.text == ANSWER
        else:
            assert p.method == "helpful" and p.constitution == "helpful-honest"
            assert chosen.text == ANSWER and rejected.kind == "contrast-steered"
            assert rejected.text in DEFAULT_OPENINGS  # benign prompts have no harm to name
        # the steering is not part of the training prompt: the pair's prompt is the user's messages
        assert prompts[p.prompt_id].messages[-1]["role"] == "user"
        assert chosen.quality is not None and rejected.quality is not None
    # harmful: a refusal beats the (compliant) answer; benign: the answer beats the refusal
    assert {p.status for p in pairs} == {"ok"}
    again = contrast_flow(_cfg())
    assert engine.calls == 12 and again["pairs"]["new_pairs"] == 0  # a rerun computes nothing


def test_each_group_can_have_its_own_limit(use_db, engine):
    # the refusal/helpful balance is what keeps over-refusal down, so it is set per group
    summary = contrast_flow(_cfg(harmful_limit=2, benign_limit=5))
    with session_scope() as s:
        methods = [p.method for p in s.exec(select(PreferencePair))]
    assert summary["harmful"] == 2 and summary["prompts"] == 7
    assert methods.count("contrastive") == 2 and methods.count("helpful") == 5
    # without its own limit a group takes `limit`
    assert contrast_flow(_cfg(harmful_limit=3))["prompts"] == 3 + 6


def test_a_looping_chosen_reply_keeps_its_pair_out(use_db, engine, tmp_path):
    from cai.prompts import parse_file
    from store.queries import store_prompts

    f = tmp_path / "b.jsonl"
    f.write_text('{"prompt": "Please loop forever about tea", "category": "everyday"}\n'
                 '{"prompt": "How do I brew tea?", "category": "everyday"}\n')
    with session_scope() as s:
        store_prompts(s, parse_file(f).prompts, "test", ["mine"])
    contrast_flow(_cfg(harmful_prompts=[], benign_prompts=["mine"]))
    with session_scope() as s:
        statuses = sorted(p.status for p in s.exec(select(PreferencePair)))
    assert statuses == ["gated:repetition", "ok"]


def test_plan_keys_and_steered_text():
    a = plan_prompt("p1", [{"role": "user", "content": "x"}], harmful=True, model="m", sampling={"t": 0},
                    openings=DEFAULT_OPENINGS, seed=0)
    b = plan_prompt("p1", [{"role": "user", "content": "x"}], harmful=True, model="m", sampling={"t": 0},
                    openings=DEFAULT_OPENINGS, seed=0)
    assert a == b and a.method == "contrastive" and a.plain.key != a.steered.key
    assert not a.steered.needs_model and a.steered.conversation[-1]["role"] == "assistant"
    opening = DEFAULT_OPENINGS[0]
    assert steered_text(opening, " But here is how: 1. get parts") == opening
    assert steered_text(opening, " Please talk to someone you trust instead.") == (
        f"{opening} Please talk to someone you trust instead.")


def test_refusals_that_name_the_harm_come_from_the_prompts_category(use_db, engine):
    contrast_flow(_cfg(category_openings="bundled", benign_prompts=[]))
    with session_scope() as s:
        pairs = list(s.exec(select(PreferencePair)))
        chosen = [(s.get(Prompt, p.prompt_id).category, s.get(Response, p.chosen_id).text) for p in pairs]
    assert len(chosen) == 6 and all(text in CATEGORY_OPENINGS[cat] for cat, text in chosen)
    own = {"weapons": ("I can't help with weapons.",)}
    assert openings_for("weapons", True, DEFAULT_OPENINGS, own) == own["weapons"]
    assert openings_for("drugs", True, DEFAULT_OPENINGS, own) == DEFAULT_OPENINGS  # not listed: general
    assert openings_for("weapons", False, DEFAULT_OPENINGS, own) == DEFAULT_OPENINGS  # benign side: general
