"""The 95 % intervals the eval, the bench and the review figures report (cai/intervals.py)."""

from __future__ import annotations

import random

import pytest

from cai.intervals import paired_difference, wilson


def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/20 -> 0-0.1611
    for k, n, lo, hi in ((81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                         (8, 10, 0.4902, 0.9433)):
        assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4), (k, n)
    assert wilson(0, 0) == (0.0, 1.0)  # nothing observed: nothing known


def test_paired_difference_is_the_rate_difference_inside_a_sound_interval():
    a = [True] * 20 + [False] * 30  # the same 50 prompts, two models
    b = [True] * 10 + [False] * 40
    diff, lo, hi = paired_difference(a, b)
    assert diff == pytest.approx(0.2) and lo < diff < hi and -1 <= lo and hi <= 1
    assert paired_difference(b, a) == pytest.approx((-0.2, -hi, -lo))  # symmetric under a swap
    same = paired_difference(a, a)
    assert same[0] == 0 and same[1] < 0 < same[2]
    with pytest.raises(ValueError, match="the same items"):
        paired_difference(a, b[:-1])


def test_paired_difference_covers_the_truth_95_times_in_100():
    """Coverage by simulation: correlated outcomes of two models on 50 prompts, true difference 0.2."""
    rng = random.Random(0)
    hits, runs = 0, 1000
    for _ in range(runs):
        first, second = [], []
        for _ in range(50):
            u = rng.random()
            first.append(u < 0.5)
            second.append(u < 0.3 if rng.random() < 0.7 else rng.random() < 0.3)
        _, lo, hi = paired_difference(first, second)
        hits += lo <= 0.2 <= hi
    assert 0.93 <= hits / runs <= 0.975
