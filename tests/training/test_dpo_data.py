"""training/data.py: TRL-format records, the store query with its filters (SQLite and PostgreSQL),
the held-out split, and the reference log-prob cache."""

from __future__ import annotations

import pytest

from store.db import session_scope
from store.keys import content_hash
from store.models import PreferencePair, Prompt, Response
from store.upsert import insert_ignore
from training.data import (
    MemoryRefCache,
    PairExample,
    PairFilter,
    RefValue,
    StoreRefCache,
    examples_from_records,
    ref_key,
    select_pairs,
    split_eval,
)


def add_pair(
    s, i: int, *, method="revision", status="ok", label_prob=1.0, constitution="harmless", version="aaaa1111"
) -> str:
    messages = [{"role": "user", "content": f"prompt {i}"}]
    pid = content_hash("prompt", messages)
    insert_ignore(s, Prompt, [Prompt(id=pid, text=f"prompt {i}", messages=messages)])
    rows = [
        Response(
            id=f"r{i}{k}",
            prompt_id=pid,
            kind="initial",
            conversation=messages,
            text=f"{k} answer {i}",
            model="m",
        )
        for k in ("good", "bad")
    ]
    insert_ignore(s, Response, rows)
    pair_id = f"pair-{i}-{method}-{status}"
    insert_ignore(
        s,
        PreferencePair,
        [
            PreferencePair(
                id=pair_id,
                prompt_id=pid,
                chosen_id=f"r{i}good",
                rejected_id=f"r{i}bad",
                method=method,
                label_prob=label_prob,
                status=status,
                constitution=constitution,
                constitution_version=version,
            )
        ],
    )
    return pair_id


def test_select_pairs_filters(db_url):
    with session_scope(db_url) as s:
        add_pair(s, 0)
        add_pair(s, 1, method="ai", label_prob=0.9)
        add_pair(s, 2, method="ai", label_prob=0.55)
        add_pair(s, 3, method="ai", status="tie", label_prob=0.5)
        add_pair(s, 4, constitution="helpful-honest", version="bbbb2222")
        add_pair(s, 5, version="cccc3333")
    with session_scope(db_url) as s:
        every = select_pairs(s, PairFilter())
        assert {e.id for e in every} == {
            "pair-0-revision-ok",
            "pair-1-ai-ok",
            "pair-2-ai-ok",
            "pair-4-revision-ok",
            "pair-5-revision-ok",
        }
        e0 = next(e for e in every if e.id == "pair-0-revision-ok")
        assert e0.prompt == ({"role": "user", "content": "prompt 0"},)
        assert (e0.chosen, e0.rejected, e0.label_prob, e0.method) == (
            "good answer 0",
            "bad answer 0",
            1.0,
            "revision",
        )
        harmless = select_pairs(s, PairFilter(constitution="harmless"))
        assert len(harmless) == 4
        assert [e.id for e in select_pairs(s, PairFilter(constitution="harmless@cccc"))] == [
            "pair-5-revision-ok"
        ]
        assert select_pairs(s, PairFilter(constitution="harmless@dddd")) == []
        ai = select_pairs(s, PairFilter(methods=("ai",), min_label_prob=0.6))
        assert [e.id for e in ai] == ["pair-1-ai-ok"]
        ties = select_pairs(s, PairFilter(methods=("ai",), statuses=("ok", "tie")))
        assert len(ties) == 3
    assert PairFilter(constitution="harmless", methods=("ai",), min_label_prob=0.6).describe() == (
        "constitution=harmless, method in (ai), status in (ok), label_prob >= 0.6"
    )


def test_a_reply_the_token_limit_cut_is_marked_not_ended(db_url):
    with session_scope(db_url) as s:
        add_pair(s, 0)
        s.get(Response, "r0bad").finish_reason = "length"
    with session_scope(db_url) as s:
        (e,) = select_pairs(s, PairFilter())
    assert (e.chosen_ended, e.rejected_ended) == (True, False)
    # its reference log-prob is of another sequence (no end-of-turn): a key of its own
    settings = {"max_length": 8}
    assert ref_key("m", settings, e.prompt, e.rejected, False) != ref_key("m", settings, e.prompt, e.rejected)
    assert ref_key("m", settings, e.prompt, e.rejected) == ref_key("m", settings, e.prompt, e.rejected, True)


def test_the_same_two_responses_count_once_and_the_latest_label_decides(db_url):
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    with session_scope(db_url) as s:
        add_pair(s, 0)  # revision pair under version aaaa1111
        add_pair(s, 1, method="ai", label_prob=0.8)
        s.flush()
        base = s.get(PreferencePair, "pair-0-revision-ok")
        ai = s.get(PreferencePair, "pair-1-ai-ok")
        base.created_at, ai.created_at = t0, t0
        # the constitution was edited; prompt 0's responses did not change, so its revision pair
        # is stored again under the new version
        s.add(PreferencePair(id="pair-0-again", prompt_id=base.prompt_id, chosen_id="r0good", rejected_id="r0bad",
                             method="revision", constitution="harmless", constitution_version="eeee5555",
                             created_at=t0 + timedelta(days=1)))
        # prompt 1 relabelled with other judge settings: now position-inconsistent, options swapped
        s.add(PreferencePair(id="pair-1-relabel", prompt_id=ai.prompt_id, chosen_id="r1bad", rejected_id="r1good",
                             method="ai", label_prob=0.52, status="position-inconsistent",
                             constitution="harmless", constitution_version="aaaa1111",
                             created_at=t0 + timedelta(days=1)))
    with session_scope(db_url) as s:
        # once, not twice; the relabel's status keeps prompt 1 out although its old label was ok
        assert [e.id for e in select_pairs(s, PairFilter(constitution="harmless"))] == ["pair-0-again"]
        assert [e.id for e in select_pairs(s, PairFilter(constitution="harmless@aaaa"))] == ["pair-0-revision-ok"]
        loose = select_pairs(s, PairFilter(statuses=("ok", "position-inconsistent")))
        assert sorted(e.id for e in loose) == ["pair-0-again", "pair-1-relabel"]


def test_latest_per_response_pair_rule():
    from datetime import UTC, datetime

    from store.pairs import latest_per_response_pair

    def pair(i, c, r, method="ai", day=1):
        return PreferencePair(id=i, prompt_id="p", chosen_id=c, rejected_id=r, method=method, constitution="h",
                              constitution_version="v", created_at=datetime(2026, 1, day, tzinfo=UTC))

    rows = [pair("a", "x", "y", day=1), pair("b", "y", "x", day=2), pair("c", "x", "y", method="revision"),
            pair("d", "x", "z", day=1), pair("e", "x", "z", day=1)]
    kept, dropped = latest_per_response_pair(rows)
    assert [p.id for p in kept] == ["b", "c", "e"] and dropped == 2  # swapped order is the same pair; ties: larger id


def test_examples_from_trl_records_and_a_hf_dataset():
    from datasets import Dataset

    rows = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
            "label_prob": 0.8,
            "method": "ai",
        },
        {
            "prompt": [{"role": "user", "content": "Bye?"}],
            "chosen": [{"role": "assistant", "content": "Goodbye."}],
            "rejected": [{"role": "assistant", "content": "No."}],
            "label_prob": None,
            "method": "revision",
        },
    ]
    for records in (rows, Dataset.from_list(rows)):
        ex = examples_from_records(records)
        assert ex[0].prompt[-1] == {"role": "user", "content": "Hi?"} and len(ex[0].prompt) == 2
        assert (ex[0].chosen, ex[0].rejected, ex[0].label_prob, ex[0].method) == (
            "Hello!",
            "Go away.",
            0.8,
            "ai",
        )
        assert ex[1].label_prob == 1.0 and ex[1].id  # no id column: a content hash
    plain = examples_from_records([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}])
    assert plain[0].prompt == ({"role": "user", "content": "Hi?"},)
    with pytest.raises(ValueError, match="record 0: missing field 'rejected'"):
        examples_from_records([{"prompt": "x", "chosen": "y"}])
    with pytest.raises(ValueError, match="record 0: prompt: the prompt must end with a user turn"):
        examples_from_records(
            [{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}]
        )
    with pytest.raises(ValueError, match="label_prob"):
        examples_from_records([{"prompt": "x", "chosen": "a", "rejected": "b", "label_prob": 2}])


def test_split_is_by_prompt_hash_and_stable():
    ex = [
        PairExample(({"role": "user", "content": f"p{i % 40}"},), f"c{i}", f"r{i}", id=str(i))
        for i in range(120)
    ]
    train, held = split_eval(ex, 0.2)
    assert len(train) + len(held) == 120 and 0 < len(held) < 60
    assert {e.prompt_key for e in train}.isdisjoint({e.prompt_key for e in held})  # no prompt on both sides
    assert split_eval(list(reversed(ex)), 0.2)[1] == list(reversed(held))  # order does not matter
    assert split_eval(ex, 0.0) == (ex, [])
    few = ex[:3]
    assert len(split_eval(few, 0.01)[1]) == 1  # a tiny set still gets a held-out prompt
    assert len(split_eval(few, 0.99)[0]) >= 1  # and never loses all its training data


def test_ref_caches(db_url):
    k = ref_key("m#1", {"max_length": 8}, [{"role": "user", "content": "x"}], "y")
    assert k != ref_key("m#1", {"max_length": 9}, [{"role": "user", "content": "x"}], "y")
    for cache in (StoreRefCache(db_url), MemoryRefCache()):
        assert cache.get([k]) == {}
        cache.put("m#1", {k: RefValue(-3.5, 7, True)})
        cache.put("m#1", {k: RefValue(-3.5, 7, True)})  # a second writer is a no-op
        assert cache.get([k, "other"]) == {k: RefValue(-3.5, 7, True)}


def test_examples_from_records_read_the_cut_flags_of_an_export():
    """`cai export` writes chosen_cut / rejected_cut: a cut reply trains without an end-of-turn, as from
    the store; a version-1 export (no such columns) or a null means not cut; a bad value names the record."""
    from datasets import Dataset

    def row(i: int, **kw):
        return {"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "A"}],
                "rejected": [{"role": "assistant", "content": "B"}], "id": f"p{i}"} | kw

    rows = [row(0, chosen_cut=True, rejected_cut=False), row(1, chosen_cut=False, rejected_cut=True),
            row(2, chosen_cut=None, rejected_cut=None)]
    for records in (rows, Dataset.from_list(rows)):
        ex = examples_from_records(records)
        assert [(e.chosen_ended, e.rejected_ended) for e in ex] == [(False, True), (True, False), (True, True)]
    (old,) = examples_from_records([row(3)])  # schema version 1: no *_cut columns
    assert (old.chosen_ended, old.rejected_ended) == (True, True)
    with pytest.raises(ValueError, match=r"record 1: chosen_cut must be true, false or null, got 'yes'"):
        examples_from_records([row(0), row(1, chosen_cut="yes")])
    with pytest.raises(ValueError, match=r"record 0: rejected_cut must be .* got 1"):
        examples_from_records([row(0, rejected_cut=1)])


def test_the_helpful_cap_keeps_preferred_prompts_first_and_repeats_weigh_them():
    from training.data import cap_method, repeat_prompts

    def ex(i: int, method: str) -> PairExample:
        return PairExample(({"role": "user", "content": f"p{i}"},), f"c{i}", f"r{i}", id=f"{i:02d}", method=method)

    pairs = [ex(i, "contrastive") for i in range(3)] + [ex(i, "helpful") for i in range(3, 13)]
    plain = cap_method(pairs, "helpful", 1.0)
    assert [p.id for p in plain if p.method == "helpful"] == ["03", "04", "05"]  # first by pair id
    wrong = {pairs[11].prompt_key, pairs[12].prompt_key, pairs[0].prompt_key}
    kept = cap_method(pairs, "helpful", 1.0, prefer=wrong)
    assert [p.id for p in kept if p.method == "helpful"] == ["03", "11", "12"]  # the wrong ones, then by id
    assert [p.id for p in kept if p.method != "helpful"] == ["00", "01", "02"]  # others untouched, in order
    assert len(cap_method(pairs, "helpful", 0.5, prefer=wrong)) == 3 + 1
    weighted = repeat_prompts(kept, wrong, 3)
    assert [p.id for p in weighted] == ["00"] * 3 + ["01", "02", "03"] + ["11"] * 3 + ["12"] * 3
    assert repeat_prompts(kept, wrong, 1) == kept
