"""95 % intervals for the rates the factory reports, so nobody reads a one-prompt change as an effect.

    from cai.intervals import wilson, paired_difference
    wilson(27, 50)                          # (0.404, 0.67): 27 of 50 harmful requests answered
    paired_difference(base, trained)        # (diff, lo, hi) for the same prompts answered by both models

`wilson` is the Wilson score interval for one proportion (good coverage down to a handful of
prompts, never outside [0, 1]). `paired_difference` is Newcombe's hybrid score interval for a
difference of two proportions measured on the same items (Newcombe 1998, method 10): it uses
both Wilson intervals and the correlation of the paired outcomes, so two models answering the
same 50 prompts get a tighter, honest interval than two independent samples would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(first: Sequence[bool], second: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """(rate(first) - rate(second), lower, upper): Newcombe's method 10 for paired binary outcomes
    (item i of `first` and of `second` are the same prompt)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same items: {len(first)} != {len(second)}")
    n = len(first)
    if n == 0:
        return 0.0, -1.0, 1.0
    a = sum(1 for x, y in zip(first, second, strict=True) if x and y)
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if not x and y)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    denom = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    # Newcombe's correlation estimate: ad - bc shrunk by n/2 when positive (0 in between)
    cross = a * d - b * c
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = cross / denom if denom else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return diff, max(-1.0, diff - delta), min(1.0, diff + eps)
