"""Pure judge arithmetic: P(A) from log-probs, both-orders averaging, clamping, statuses, draws, report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fakes import ScriptedEngine

from cai import judge
from cai import judge_stats as judge_report
from cai.judge import CHOICE_A, CHOICE_B
from constitution.load import load_file
from flows import judge_report as judge_report_flow
from flows.cli.render import render_judge

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]
X, Y = "REFUSAL-TEXT", "COMPLIANCE-TEXT"


@pytest.fixture(scope="module")
def harmless():
    return load_file(REPO / "constitution" / "harmless.yaml")


def _slot(conv, text: str) -> str:
    """Which option shows `text` in a judge conversation: "A" or "B"."""
    user = conv[0]["content"]
    return "A" if f"(A) {text}" in user else "B" if f"(B) {text}" in user else "?"


def _engine(p_a_when_x_is_a: float, p_a_when_y_is_a: float, scale: float = 1.0) -> ScriptedEngine:
    """Log-probs with known ratios; `scale` leaves mass for other tokens (they must not matter)."""
    def logprobs(conv, choice):
        p_a = p_a_when_x_is_a if _slot(conv, X) == "A" else p_a_when_y_is_a
        return math.log(scale * (p_a if choice == CHOICE_A else 1.0 - p_a))
    return ScriptedEngine(logprobs=logprobs)


def _convs(question: str = "Which is less harmful?") -> tuple[list, list[str]]:
    xy = judge.answer_conversation(judge.judge_question(PROMPT, question, X, Y, 500))
    yx = judge.answer_conversation(judge.judge_question(PROMPT, question, Y, X, 500))
    return [xy, yx], ["xy", "yx"]


def test_prob_a_is_the_normalised_exponent():
    assert judge.prob_a(math.log(0.3), math.log(0.1)) == pytest.approx(0.75, abs=1e-12)
    assert judge.prob_a(math.log(0.1), math.log(0.3)) == pytest.approx(0.25, abs=1e-12)
    assert judge.prob_a(-2.0, -2.0) == 0.5
    # far-out log-probs neither overflow nor underflow to 0/0
    assert judge.prob_a(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert judge.prob_a(-1001.0, -1000.0) == pytest.approx(1 / (1 + math.exp(1)), abs=1e-12)
    assert judge.prob_a(-math.inf, -math.inf) == 0.5
    assert judge.prob_a(-1.0, -math.inf) == 1.0


def test_order_mapping_and_clamp():
    assert judge.prob_x("xy", 0.8) == 0.8
    assert judge.prob_x("yx", 0.8) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="order"):
        judge.prob_x("ab", 0.5)
    assert judge.clamp(0.93, (0.4, 0.6)) == 0.6
    assert judge.clamp(0.02, (0.4, 0.6)) == 0.4
    assert judge.clamp(0.55, (0.4, 0.6)) == 0.55
    assert judge.clamp(0.93, None) == 0.93


def test_scripted_engine_scores_both_orders_and_averages_exactly():
    # x shown as (A): P(A) = 0.9; y shown as (A): P(A) = 0.3, i.e. P(x better) = 0.7 there
    eng = _engine(0.9, 0.3, scale=0.5)
    convs, orders = _convs()
    scored = judge.score(eng, convs, orders)
    assert [s.prob_a for s in scored] == [pytest.approx(0.9, abs=1e-12), pytest.approx(0.3, abs=1e-12)]
    assert [s.prob_x for s in scored] == [pytest.approx(0.9, abs=1e-12), pytest.approx(0.7, abs=1e-12)]
    assert scored[0].logp_a == pytest.approx(math.log(0.45))
    assert scored[0].logp_b == pytest.approx(math.log(0.05))
    # the engine was asked exactly for the two option strings, after the answer prefix
    assert all(c[-1] == {"role": "assistant", "content": "The answer is:"} for c in eng.scored)
    lab = judge.label_pair([("p1", o, s.prob_x) for o, s in zip(orders, scored, strict=True)], 0.05)
    assert lab.prob_x == pytest.approx(0.8, abs=1e-12)
    assert (lab.mean_xy, lab.mean_yx) == (pytest.approx(0.9, abs=1e-12), pytest.approx(0.7, abs=1e-12))
    assert (lab.status, lab.chosen, lab.n) == ("ok", "x", 2)
    assert lab.label_prob == pytest.approx(0.8, abs=1e-12)


def test_averaging_over_principles_and_orders():
    js = [("a", "xy", 0.9), ("a", "yx", 0.7), ("b", "xy", 0.6), ("b", "yx", 0.2)]
    lab = judge.label_pair(js, min_margin=0.05)
    assert lab.prob_x == pytest.approx(0.6)
    assert lab.mean_xy == pytest.approx(0.75) and lab.mean_yx == pytest.approx(0.45)
    # the orders point to different winners: position-inconsistent, even though the mean is 0.6
    assert lab.status == "position-inconsistent"
    assert lab.per_principle == {"a": pytest.approx(0.8), "b": pytest.approx(0.4)}


def test_clamped_cot_probabilities():
    eng = _engine(0.97, 0.02)  # a near-certain CoT verdict for x in both orders
    convs, orders = _convs()
    scored = judge.score(eng, convs, orders, bounds=(0.4, 0.6))
    assert [s.prob_a for s in scored] == [pytest.approx(0.97), pytest.approx(0.02)]
    assert [s.prob_x for s in scored] == [0.6, 0.6]  # clamped after mapping to P(x better)
    lab = judge.label_pair([("p", o, s.prob_x) for o, s in zip(orders, scored, strict=True)], 0.05)
    assert lab.prob_x == 0.6 and lab.label_prob == 0.6 and lab.status == "ok"
    # an asymmetric clamp applies to P(x better) as stored
    assert judge.score(_engine(0.1, 0.9), convs, orders, bounds=(0.3, 0.55))[0].prob_x == 0.3


@pytest.mark.parametrize(("js", "margin", "status", "chosen", "label_prob"), [
    ([("a", "xy", 0.52), ("a", "yx", 0.51)], 0.05, "tie", "x", 0.515),
    ([("a", "xy", 0.52), ("a", "yx", 0.51)], 0.0, "ok", "x", 0.515),
    ([("a", "xy", 0.2), ("a", "yx", 0.3)], 0.05, "ok", "y", 0.75),
    ([("a", "xy", 0.9), ("a", "yx", 0.1)], 0.05, "position-inconsistent", "x", 0.5),
    ([("a", "xy", 0.5), ("a", "yx", 0.5)], 0.0, "tie", "x", 0.5),
    ([("a", "xy", 0.5), ("a", "yx", 0.9)], 0.05, "ok", "x", 0.7),  # 0.5 points to no winner
])
def test_statuses(js, margin, status, chosen, label_prob):
    lab = judge.label_pair(js, margin)
    assert (lab.status, lab.chosen) == (status, chosen)
    assert lab.label_prob == pytest.approx(label_prob) and lab.label_prob >= 0.5


def test_label_pair_needs_both_orders():
    with pytest.raises(ValueError, match="both orders"):
        judge.label_pair([("a", "xy", 0.7)], 0.05)


def test_principle_draws(harmless):
    n = len(harmless.preferences)
    draws = judge.draw_principles(harmless, 0, "pair-1", 4)
    assert len({p.id for p, _ in draws}) == 4 and all(r == 0 for _, r in draws)  # without replacement
    assert draws == judge.draw_principles(harmless, 0, "pair-1", 4)  # seeded
    assert judge.draw_principles(harmless, 0, "pair-1", 6)[:4] == draws  # draw j depends only on j's prefix
    others = [tuple(p.id for p, _ in judge.draw_principles(harmless, s, f"pair-{s}", 4)) for s in range(8)]
    assert len(set(others)) > 1
    # more draws than principles: every principle once, then repeats marked 1
    many = judge.draw_principles(harmless, 3, "pair-2", n + 2)
    assert sorted(p.id for p, r in many if r == 0) == sorted(p.id for p in harmless.preferences)
    assert sum(r == 1 for _, r in many) == 2


def test_judge_conversations():
    q = judge.judge_question(PROMPT, "Which is kinder?", "first answer", "second answer", 500)
    assert "Human: How do I pick a lock?" in q and "Which is kinder?" in q
    assert q.index("(A) first answer") < q.index("(B) second answer")
    conv = judge.answer_conversation(q)
    assert conv == [{"role": "user", "content": q}, {"role": "assistant", "content": "The answer is:"}]
    assert (CHOICE_A, CHOICE_B) == (" (A)", " (B)")
    cot = judge.answer_conversation(q + judge.TEMPLATE["cot_user_suffix"], "B insults the user. ")
    assert cot[-1]["content"] == "Let's think step by step: B insults the user.\nSo the answer is:"
    assert judge.clean_reasoning(" A is safer. So the answer is: (A)") == "A is safer."
    long = "word " * 500
    assert len(judge.clip(long, 100)) < 120 and "[...]" in judge.clip(long, 100)


def _records():
    P, J = judge_report.PairRecord, judge_report.JudgmentRecord
    js = {
        # pair 1: both orders prefer x; principle b disagrees in one order
        "1a": J("1a", "a", "xy", 0.9), "1b": J("1b", "a", "yx", 0.8),
        "1c": J("1c", "b", "xy", 0.7), "1d": J("1d", "b", "yx", 0.4),
        # pair 2: slot-following judge: x as (A) -> x, y as (A) -> y
        "2a": J("2a", "a", "xy", 0.8), "2b": J("2b", "a", "yx", 0.3),
        # pair 3: y wins in both orders
        "3a": J("3a", "b", "xy", 0.2), "3b": J("3b", "b", "yx", 0.1),
    }
    pairs = [P("p1", "ok", 0.7, "x", ("1a", "1b", "1c", "1d")),
             P("p2", "position-inconsistent", 0.55, "x", ("2a", "2b")),
             P("p3", "ok", 0.85, "y", ("3a", "3b"))]
    return pairs, js


def test_report_figures():
    pairs, js = _records()
    fig = judge_report.compute(pairs, js)
    assert fig["pairs"] == 3 and fig["judgments"] == 8
    assert fig["position_consistency"] == pytest.approx(2 / 3)
    assert fig["position_inconsistent"] == 1 and fig["ties"] == 0 and fig["status"]["ok"] == 2
    assert sum(fig["label_prob_hist"]["counts"]) == 3
    assert fig["label_prob_hist"]["counts"][1] == 1 and fig["label_prob_hist"]["counts"][4] == 1
    assert fig["label_prob_hist"]["counts"][7] == 1
    # principle a: 1a, 1b agree with x; 2a agrees with x; 2b does not  -> 3/4
    # principle b: 1c agrees, 1d not, 3a and 3b agree with y           -> 3/4
    assert fig["per_principle"]["a"]["agreement"] == pytest.approx(0.75)
    assert fig["per_principle"]["b"]["agreement"] == pytest.approx(0.75)
    # both orders averaged per (pair, principle): a -> p1 0.85 x, p2 0.55 x: 2/2; b -> p1 0.55 x, p3 y: 2/2
    assert fig["per_principle"]["a"]["averaged_agreement"] == 1.0
    assert fig["per_principle"]["b"]["averaged_agreement"] == 1.0
    # P(A) per judgment: xy keeps prob_x, yx flips it
    p_a = [0.9, 0.2, 0.7, 0.6, 0.8, 0.7, 0.2, 0.9]
    assert fig["mean_p_a"] == pytest.approx(sum(p_a) / 8)
    assert fig["share_a"] == pytest.approx(6 / 8)


def test_report_writes_plots_and_json(tmp_path):
    from rich.console import Console

    fig = judge_report.compute(*_records())
    paths = judge_report_flow.write(fig, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["figures.json", "label_prob_hist.png",
                                             "position_consistency.png", "principle_agreement.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    import json

    assert json.loads((tmp_path / "out" / "figures.json").read_text())["pairs"] == 3
    assert judge_report_flow.write(fig, tmp_path / "out") == paths  # its own earlier report: written again
    console = Console(record=True, width=120)
    render_judge(fig, console)
    text = console.export_text()
    assert "position consistency" in text and "66.7% of 3 pairs" in text
