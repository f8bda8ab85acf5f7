import math

import pytest

from cai.best_of_n import pair_id, pick


def test_best_against_worst_with_the_margin_as_label():
    p = pick({"a": 0.3, "b": -1.2, "c": 1.9}, min_margin=0.05)
    assert (p.chosen, p.rejected, p.status) == ("c", "b", "ok")
    assert p.margin == pytest.approx(3.1) and p.label_prob == pytest.approx(1 / (1 + math.exp(-3.1)))


def test_near_equal_scores_are_a_tie_and_one_reply_is_refused():
    assert pick({"a": 0.10, "b": 0.11}, min_margin=0.05).status == "tie"
    assert pick({"a": 1.0, "b": 1.0}).chosen == "a"  # deterministic on equal scores
    with pytest.raises(ValueError, match="at least 2"):
        pick({"a": 1.0})


def test_pair_id_ignores_sample_order_but_not_the_reward_model():
    assert pair_id("p", ["x", "y"], "rm#1", 0.05) == pair_id("p", ["y", "x"], "rm#1", 0.05)
    assert pair_id("p", ["x", "y"], "rm#1", 0.05) != pair_id("p", ["x", "y"], "rm#2", 0.05)
