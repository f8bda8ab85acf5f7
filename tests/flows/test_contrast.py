"""The contrast flow: every steering text from the constitution, every pair attributed to its principle,
gated, resumable, and incremental when one principle is edited."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import select

from cai.contrast import plan_prompt, steered_text
from constitution.govern import Governance
from constitution.load import find, load_file, parse_text
from flows.contrast import ContrastConfig, contrast_flow
from flows.engine_cache import drop_engines, register_engine
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
    base = dict(model="answers", prompts=["red-team", "benign"], limit=6, runner={"show_progress": False})
    return ContrastConfig(**(base | kw))


def _bundled() -> Governance:
    return Governance([load_file(find(n)) for n in ("harmless", "helpful-honest")])


def _add(tmp_path: Path, tag: str, lines: list[str]) -> None:
    from cai.prompts import parse_file
    from store.queries import store_prompts

    f = tmp_path / f"{tag}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with session_scope() as s:
        store_prompts(s, parse_file(f).prompts, "test", [tag])


def test_every_steering_text_comes_from_the_governing_principle(use_db, engine):
    summary = contrast_flow(_cfg())
    gov = _bundled()
    with session_scope() as s:
        pairs = list(s.exec(select(PreferencePair)))
        rows = {r.id: r for r in s.exec(select(Response))}
        prompts = {p.id: p for p in s.exec(select(Prompt))}
    rules = [gov.rule(prompts[p.prompt_id].category) for p in pairs]
    completing = sum(not r.refuse and bool(r.principle.counter_openings) for r in rules)
    assert summary["refuse"] == 6 and summary["prompts"] == 12 and len(pairs) == 12
    # one plain reply per prompt; a constitution text needs no model call, except a counter-opening,
    # which the model finishes
    assert completing and engine.calls == 12 + completing
    for p in pairs:
        rule = gov.rule(prompts[p.prompt_id].category)
        chosen, rejected = rows[p.chosen_id], rows[p.rejected_id]
        assert p.principle_ids == [rule.principle.id] and p.constitution == rule.constitution.name
        assert p.details["principle_hashes"] == {rule.principle.id: rule.principle.hash}
        if p.method == "contrastive":  # a red-team category: its harm principle's own example is chosen
            assert rule.refuse and chosen.kind == "contrast-steered" and rejected.text == ANSWER
            assert chosen.text in rule.principle.examples
            want = {"text": chosen.text, "principle": rule.principle.id, "principle_hash": rule.principle.hash,
                    "source": "examples"}
            assert {k: chosen.steering[k] for k in want} == want
            assert chosen.principle_id == rule.principle.id
        else:  # a benign category: the plain answer over one of the principle's needless refusals
            assert p.method == "helpful" and not rule.refuse and chosen.text == ANSWER
            if rule.principle.counter_openings:  # the model finished the opening's sentence
                assert rejected.steering["text"] in rule.principle.counter_openings
                assert rejected.text == f"{rejected.steering['text']} {ANSWER.split('.')[0]}."
            else:
                assert rejected.text in rule.principle.counter_examples
        # the steering is not part of the training prompt: the pair's prompt is the user's messages
        assert prompts[p.prompt_id].messages[-1]["role"] == "user"
    # each harm category's refusal names its own principle, not one generic sentence for all
    assert len({p.principle_ids[0] for p in pairs if p.method == "contrastive"}) >= 3
    assert {p.status for p in pairs} == {"ok"}
    again = contrast_flow(_cfg())
    assert engine.calls == 12 + completing and again["pairs"]["new_pairs"] == 0  # a rerun computes nothing


def test_each_stance_can_have_its_own_limit(use_db, engine):
    # the refusal/helpful balance is what keeps over-refusal down, so it is set per stance
    summary = contrast_flow(_cfg(refuse_limit=2, answer_limit=5))
    with session_scope() as s:
        methods = Counter(p.method for p in s.exec(select(PreferencePair)))
    assert summary["refuse"] == 2 and summary["prompts"] == 7
    assert methods == {"contrastive": 2, "helpful": 5}
    assert contrast_flow(_cfg(refuse_limit=3))["prompts"] == 3 + 6  # without its own limit: `limit`


def test_a_looping_chosen_reply_keeps_its_pair_out(use_db, engine, tmp_path):
    _add(tmp_path, "mine", ['{"prompt": "Please loop forever about tea", "category": "everyday"}',
                            '{"prompt": "How do I brew tea?", "category": "everyday"}'])
    contrast_flow(_cfg(prompts=["mine"]))
    with session_scope() as s:
        statuses = sorted(p.status for p in s.exec(select(PreferencePair)))
    assert statuses == ["gated:repetition", "ok"]


def test_prompts_no_principle_governs_make_no_pairs_and_are_counted(use_db, engine, tmp_path):
    """Which prompts are refused is declared, never guessed from a category name: an unknown category
    (or none at all) is governed by nothing, and the run says so."""
    _add(tmp_path, "odd", ['{"prompt": "How does compound interest work?", "category": "finance"}',
                           '{"prompt": "Tell me about tides."}', '{"prompt": "How do I brew tea?", '
                           '"category": "everyday"}'])
    summary = contrast_flow(_cfg(prompts=["odd"]))
    assert summary["prompts"] == 1 and summary["ungoverned"] == {"finance": 1, "(no category)": 1}
    from flows.common import UserError

    _add(tmp_path, "lost", ['{"prompt": "What is a bond?", "category": "finance"}'])
    with pytest.raises(UserError, match="none is governed by a principle of harmless, helpful-honest.*finance 1"):
        contrast_flow(_cfg(prompts=["lost"]))


MONEY = """
name: money-safe
description: No personal stock or coin picks; money questions in general are answered.
principles:
  - id: no-picks
    critique: Did your last response tell the user which stock, coin or fund to buy?
    revision: Rewrite your response without naming anything to buy; explain how to decide instead.
    stance: refuse
    governs:
      categories: [stock-picks]
    examples:
      - Picking shares for you to buy is not something I do; an adviser who knows your finances can.
      - I won't name a stock or coin to buy. Nobody can promise which one will rise.
  - id: teach-money
    critique: Did your last response refuse a general money question?
    revision: Rewrite your response to explain the idea plainly.
    stance: answer
    governs:
      categories: [finance]
    counter_examples:
      - Sorry, I don't give out financial information of any kind.
preferences:
  - id: safer
    question: Which response avoids telling the user what to buy?
few_shot:
  - prompt: Which coin should I buy?
    response: Buy coin X now.
    principle: no-picks
    critique: I named a coin to buy.
    revision: I won't name a coin to buy; here is how people compare them.
"""


def test_a_teams_own_constitution_and_refusals_make_pairs_that_pass_the_gates(use_db, engine, tmp_path):
    """A user's domain refusal, which no built-in pattern knows, is a refusal to the gates because
    the constitution teaches it; their benign category is answered because they declared it."""
    path = tmp_path / "money-safe.yaml"
    path.write_text(MONEY)
    _add(tmp_path, "money", ['{"prompt": "Which three stocks will double this year?", "category": "stock-picks"}',
                             '{"prompt": "Should I put everything into one coin?", "category": "stock-picks"}',
                             '{"prompt": "How does compound interest work?", "category": "finance"}'])
    summary = contrast_flow(_cfg(prompts=["money"], constitutions=[str(path)]))
    with session_scope() as s:
        pairs = sorted(s.exec(select(PreferencePair)), key=lambda p: p.method)
        texts = {r.id: r.text for r in s.exec(select(Response))}
    assert summary["refuse"] == 2 and [p.status for p in pairs] == ["ok", "ok", "ok"]
    assert [p.method for p in pairs] == ["contrastive", "contrastive", "helpful"]
    assert {p.constitution for p in pairs} == {"money-safe"}
    c = parse_text(MONEY)
    assert {texts[p.chosen_id] for p in pairs[:2]} <= set(c.principle("no-picks").examples)
    assert texts[pairs[2].rejected_id] in c.principle("teach-money").counter_examples


def test_editing_one_principle_redoes_only_the_pairs_it_governs(use_db, engine, tmp_path):
    """An edit of the weapons principle's examples makes new steered rows and pairs for weapons
    prompts only; no plain reply is recomputed, no other pair is minted again, and the store's
    pairs of the new version count each pair once."""
    from training.data import PairFilter, select_pairs

    src = Path(find("harmless")).read_text()
    path = tmp_path / "harmless.yaml"
    path.write_text(src)
    cfg = _cfg(prompts=["red-team"], constitutions=[str(path), "helpful-honest"], limit=None)
    contrast_flow(cfg)
    with session_scope() as s:
        before_pairs = {p.id: p for p in s.exec(select(PreferencePair))}
        before_rows = {r.id for r in s.exec(select(Response))}
        weapons = {p.id for p in s.exec(select(Prompt).where(Prompt.category == "weapons"))}
    calls = engine.calls
    old = "      - I can't help with making or modifying weapons, because they could be used to hurt people."
    edited = src.replace(old, "      - Weapons are a line I don't cross, so no building, converting or hiding them.")
    assert edited != src
    path.write_text(edited)
    summary = contrast_flow(cfg)
    with session_scope() as s:
        after_pairs = {p.id: p for p in s.exec(select(PreferencePair))}
        new_rows = [r for r in s.exec(select(Response)) if r.id not in before_rows]
        new_version = load_file(path).version
        current = select_pairs(s, PairFilter(constitution=f"harmless@{new_version}", methods=("contrastive",)))
    assert engine.calls == calls, "no plain reply is recomputed"
    new_pairs = [p for i, p in after_pairs.items() if i not in before_pairs]
    assert new_pairs and {p.prompt_id for p in new_pairs} <= weapons
    assert all(r.kind == "contrast-steered" and r.prompt_id in weapons for r in new_rows)
    assert summary["pairs"]["new_pairs"] == len(new_pairs) < len(weapons) + 1
    # the new version's pairs: each prompt once, the unchanged principles' pairs carried over as they were
    assert len(current) == len({p.prompt_id for p in before_pairs.values()}) == len({e.prompt_key for e in current})
    kept_ids = {e.id for e in current}
    assert {i for i, p in before_pairs.items() if p.prompt_id not in weapons} <= kept_ids


def test_plan_keys_and_steered_text():
    gov = _bundled()
    rule = gov.rule("weapons")
    a = plan_prompt("p1", [{"role": "user", "content": "x"}], rule, model="m", sampling={"t": 0}, seed=0)
    b = plan_prompt("p1", [{"role": "user", "content": "x"}], rule, model="m", sampling={"t": 0}, seed=0)
    assert a == b and a.method == "contrastive" and a.plain.key != a.steered.key
    assert not a.steered.needs_model and a.steered.conversation[-1]["role"] == "assistant"
    assert a.steered.conversation[-1]["content"] in rule.principle.examples
    opening = rule.principle.examples[0]
    assert steered_text(opening, " But here is how: 1. get parts") == opening
    assert steered_text(opening, " Please talk to someone you trust instead.") == (
        f"{opening} Please talk to someone you trust instead.")


@pytest.mark.parametrize(("category", "method", "chosen"), [("weapons", "contrastive", "steered"),
                                                           ("everyday", "helpful", "plain")])
def test_a_pair_row_takes_its_sides_from_the_stance(category, method, chosen):
    """cai/contrast.py: pair_row is the one place a contrastive pair is made (the flow calls it)."""
    from cai.contrast import pair_key, pair_row

    rule = _bundled().rule(category)
    plan = plan_prompt("p1", [{"role": "user", "content": "x"}], rule, model="m", sampling={"t": 0}, seed=0)
    sides = {"plain": Response(id="r-plain", prompt_id="p1", kind="contrast-plain", text="a", model="m"),
             "steered": Response(id="r-steered", prompt_id="p1", kind="contrast-steered", text="b", model="m",
                                 steering=plan.steered.steering)}
    row = pair_row(plan, sides["plain"], sides["steered"], status="ok", policy_model="m", run_id="r")
    rejected = "plain" if chosen == "steered" else "steered"
    assert (row.method, row.chosen_id, row.rejected_id) == (method, f"r-{chosen}", f"r-{rejected}")
    assert row.id == pair_key(rule.constitution.name, "p1", f"r-{chosen}", f"r-{rejected}", method)
    assert row.principle_ids == [rule.principle.id] and row.details["steered_id"] == "r-steered"


def test_a_counter_opening_is_finished_by_the_models_first_sentence():
    from cai.contrast import completed_text

    assert completed_text("I won't help with", " scams or lies. I'm here to help with whatever") == \
        "I won't help with scams or lies."
    assert completed_text("I won't help with", "\nthat sort of thing!\nMore") == "I won't help with that sort of thing!"
    assert completed_text("I won't help with", " that") is None  # no sentence end: no pair
    assert completed_text("I won't help with", " that.") == "I won't help with that."  # the usual one
    assert completed_text("I won't help with", " .") is None
    assert completed_text("I can't help with", ", sadly, recipes.") == "I can't help with, sadly, recipes."
