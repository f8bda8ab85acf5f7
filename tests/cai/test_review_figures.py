"""cai/review.py: what a verdict means, the latest verdict per person, what --reviewed keeps, the
agreement figures (Wilson intervals against published values), the card paragraph and the record shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cai import review
from cai.intervals import wilson
from store.models import PreferencePair

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def v(pair: str, who: str, verdict: str, minute: int = 0, left: str = "chosen", **kw) -> review.Verdict:
    return review.Verdict(pair, who, verdict, left, T0 + timedelta(minutes=minute), **kw)


def test_choice_and_verdict_are_inverse_for_both_sides():
    assert review.verdict_for("left", "chosen") == "chosen"
    assert review.verdict_for("left", "rejected") == "rejected"
    assert review.verdict_for("right", "chosen") == "rejected"
    assert review.verdict_for("right", "rejected") == "chosen"
    assert review.verdict_for("tie", "rejected") == "tie"
    for choice in review.CHOICES:
        for left in review.SIDES:
            assert review.choice_for(review.verdict_for(choice, left), left) == choice
    with pytest.raises(ValueError, match="choice 'up'"):
        review.verdict_for("up", "chosen")
    with pytest.raises(ValueError, match="left 'middle'"):
        review.verdict_for("left", "middle")


def test_share_of_nothing_has_no_rate_or_interval():
    assert review.share(0, 0) == {"k": 0, "n": 0, "rate": None, "low": None, "high": None}


def test_latest_verdict_per_person_counts_and_skips_are_no_verdict():
    rows = [v("p1", "ann", "rejected", 0), v("p1", "ann", "chosen", 5), v("p1", "ann", "skip", 9),
            v("p1", "bob", "tie", 1), v("p2", "ann", "skip", 0)]
    got = {(x.pair_id, x.reviewer): x.verdict for x in review.latest(rows)}
    assert got == {("p1", "ann"): "chosen", ("p1", "bob"): "tie"}


def test_consensus_is_a_strict_majority():
    assert review.consensus([]) is None
    assert review.consensus(["chosen"]) == "chosen"
    assert review.consensus(["chosen", "rejected"]) == "disputed"
    assert review.consensus(["rejected", "rejected", "chosen"]) == "rejected"
    assert review.consensus(["skip", "tie"]) == "tie"


def test_decide_keeps_drops_and_flips_by_mode():
    verdicts = [v("agreed", "ann", "chosen"), v("flipped", "ann", "rejected"), v("flipped", "bob", "rejected"),
                v("tied", "ann", "tie"), v("bad", "ann", "both-bad"), v("split", "ann", "chosen"),
                v("split", "bob", "rejected")]
    ids = ["agreed", "flipped", "tied", "bad", "split", "unseen"]
    anyway = review.decide(ids, verdicts, "any", False)
    assert anyway.keep == set(ids) and not anyway.flip
    nr = review.decide(ids, verdicts, "not-rejected", False)
    assert nr.keep == {"agreed", "split", "unseen"}
    assert nr.dropped == {"rejected": 1, "tie": 1, "both-bad": 1}
    agreed = review.decide(ids, verdicts, "agreed", False)
    assert agreed.keep == {"agreed"} and agreed.dropped["not reviewed"] == 1 and agreed.dropped["disputed"] == 1
    people = review.decide(ids, verdicts, "agreed", True)
    assert people.keep == {"agreed"} and people.flip == {"flipped": 1.0}
    assert review.decide(ids, verdicts, "any", True).flip == {"flipped": 1.0}
    with pytest.raises(ValueError, match="reviewed 'all'"):
        review.decide(ids, verdicts, "all", False)


def test_flipped_copy_swaps_without_touching_the_pair():
    p = PreferencePair(id="p", prompt_id="q", chosen_id="a", rejected_id="b", method="ai", label_prob=0.8,
                       constitution="c", constitution_version="v", details={"x_id": "a"})
    f = review.flipped_copy(p, 0.75)
    assert (f.chosen_id, f.rejected_id, f.label_prob) == ("b", "a", 0.75)
    assert f.details["people_order"] is True and f.details["judge_label_prob"] == 0.8
    assert (p.chosen_id, p.rejected_id, p.label_prob, p.details) == ("a", "b", 0.8, {"x_id": "a"})


def test_compute_against_a_hand_count():
    """Five pairs, three people: every figure below counted by hand."""
    facts = {"method": "ai", "status": "ok", "judge_model": "j"}
    rows = [
        v("p1", "ann", "chosen", left="chosen", label_prob=0.95, principle_ids=("a",), **facts),
        v("p1", "bob", "chosen", left="rejected", label_prob=0.95, principle_ids=("a",), **facts),
        v("p2", "ann", "rejected", left="rejected", label_prob=0.62, principle_ids=("a", "b"), **facts),
        v("p2", "bob", "chosen", left="chosen", label_prob=0.62, principle_ids=("a", "b"), ai_shown=True, **facts),
        v("p3", "ann", "tie", label_prob=0.55, principle_ids=("b",), **facts),
        v("p4", "cy", "both-bad", method="revision", status="ok"),
        v("p5", "cy", "rejected", 0, left="chosen", method="revision", status="ok"),
        v("p5", "cy", "chosen", 3, left="chosen", method="revision", status="ok"),  # replaces the one above
        v("p5", "ann", "skip", method="revision", status="ok"),
    ]
    st = review.compute(rows)
    assert st["rows"] == 9 and st["skips"] == 1 and st["reviewers"] == ["ann", "bob", "cy"]
    o = st["overall"]
    # latest non-skip: p1 ann C, p1 bob C, p2 ann R, p2 bob C, p3 ann T, p4 cy B, p5 cy C -> 7 verdicts
    assert (o["verdicts"], o["pairs"], o["tie"], o["both_bad"]) == (7, 5, 1, 1)
    assert (o["agreement"]["k"], o["agreement"]["n"]) == (4, 5)  # decisive: C C R C C
    assert o["agreement"]["low"] == pytest.approx(wilson(4, 5)[0])
    assert st["by_method"]["ai"]["agreement"]["k"] == 3 and st["by_method"]["ai"]["agreement"]["n"] == 4
    assert st["by_method"]["revision"]["agreement"]["n"] == 1 and st["by_method"]["revision"]["both_bad"] == 1
    assert st["by_principle"]["a"]["agreement"]["n"] == 4 and st["by_principle"]["b"]["tie"] == 1
    assert st["by_principle"]["(none)"]["verdicts"] == 2
    assert st["by_judge"][review.NO_JUDGE]["verdicts"] == 2 and st["by_judge"]["j"]["verdicts"] == 5
    assert (st["blind"]["k"], st["blind"]["n"]) == (3, 4)  # bob's p2 verdict came after opening the label
    # human-human: p1 (C, C) agree, p2 (R, C) disagree
    assert (st["human_human"]["pairs"], st["human_human"]["k"], st["human_human"]["n"]) == (2, 1, 2)
    # picked left: p1 ann C/left chosen yes; p1 bob C/left rejected no; p2 ann R/left rejected yes;
    # p2 bob C/left chosen yes; p5 cy C/left chosen yes -> 4 of 5
    assert (st["picked_left"]["k"], st["picked_left"]["n"]) == (4, 5)
    cal = {tuple(c["bin"]): (c["k"], c["n"]) for c in st["calibration"]}
    assert cal == {(0.9, 1.0): (2, 2), (0.6, 0.7): (1, 2)}  # p3's tie is not decisive; revision has no judge


def test_card_lines_say_how_many_were_checked_and_the_agreement():
    st = review.public(review.compute([v("p1", "ann", "chosen"), v("p2", "ann", "rejected"), v("p3", "bob", "tie")]))
    facts = {"mode": "agreed", "people_order": True, "pairs_selected": 10, "flipped": 1, "dropped": {"tie": 1},
             "stats": st}
    text = "\n".join(review.card_lines(facts))
    assert "People checked 3 of the 10 pairs" in text and "2 people" in text
    assert "1 of 2 verdicts (50.0 %, 95 % Wilson interval 9.5 % to 90.5 %)" in text
    assert "`--reviewed agreed`" in text and "tie 1" in text and "1 pairs people flipped" in text
    assert "ann" not in text and "bob" not in text  # a published card names nobody
    empty = review.public(review.compute([]))
    text = "\n".join(review.card_lines({"mode": "any", "people_order": False, "pairs_selected": 4, "flipped": 0,
                                        "dropped": {}, "stats": empty}))
    assert "No person checked any of the 4 pairs" in text and "--reviewed" not in text
    assert review.card_lines(None) == []


def test_records_round_trip_with_the_verdicts_in_the_pair_terms():
    pairs = [PreferencePair(id=f"p{i}", prompt_id="q", chosen_id=f"c{i}", rejected_id=f"r{i}", method="ai",
                            label_prob=0.7, constitution="c", constitution_version="v", judge_model="j")
             for i in range(8)]
    firsts = {review.first_side(p.id) for p in pairs}
    assert firsts == {"chosen", "rejected"}  # the factory's choice is not always response1
    for p in pairs:
        texts = {p.chosen_id: "good", p.rejected_id: "bad"}
        rec = review.to_record(p, [{"role": "user", "content": "hi"}], texts,
                               [v(p.id, "ann", "rejected", note="the other one is right"), v(p.id, "bob", "tie")])
        first = review.first_side(p.id)
        assert rec["fields"]["response1"] == ("good" if first == "chosen" else "bad")
        assert rec["suggestions"]["preference"] == {"value": "response1" if first == "chosen" else "response2",
                                                    "score": 0.7, "agent": "j"}
        back = review.from_record(rec, {p.id: p.chosen_id})
        assert {(x.reviewer, x.verdict, x.note) for x in back} == {("ann", "rejected", "the other one is right"),
                                                                   ("bob", "tie", None)}
        assert {x.left for x in back} == {first}


@pytest.mark.parametrize("rec, message", [
    ([], "expected a JSON object"),
    ({"id": "nope"}, "no such preference pair"),
    ({"id": "p", "metadata": {}}, "response1_id is missing"),
    ({"id": "p", "metadata": {"response1_id": "c"}, "responses": {"preference": [{"value": "left",
                                                                                 "user_id": "ann"}]}},
     "value 'left'"),
    ({"id": "p", "metadata": {"response1_id": "c"}, "responses": {"preference": [{"value": "tie"}]}},
     "reviewer ''"),
])
def test_bad_records_are_named(rec, message):
    with pytest.raises(ValueError, match=message):
        review.from_record(rec, {"p": "c"})


def test_draft_and_discarded_responses():
    rec = {"id": "p", "metadata": {"response1_id": "r"},
           "responses": {"preference": [{"value": "response1", "user_id": "ann", "status": "draft"},
                                        {"value": "response2", "user_id": "bob", "status": "discarded"}]}}
    assert [(x.reviewer, x.verdict, x.left) for x in review.from_record(rec, {"p": "c"})] == [("bob", "skip",
                                                                                               "rejected")]
