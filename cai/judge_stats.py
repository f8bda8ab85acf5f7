"""How trustworthy are the AI labels? Position consistency, label spread, principle agreement.

Pure statistics over plain records: `records(pairs, judgments)` turns store rows into them,
`compute` gives every figure of the judge report. A judge that follows the slot rather than
the content shows it here: low position consistency (the two orders point to different
winners), mean P(A) far from 0.5, and principles that agree with the ensemble about half the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cai import judge
from store.models import Judgment, PreferencePair

BINS = 10  # label probabilities fall in [0.5, 1]: ten bins of 0.05


@dataclass(frozen=True)
class PairRecord:
    id: str
    status: str
    label_prob: float
    chosen: str  # "x" or "y": which canonical response the pair's label prefers
    judgments: tuple[str, ...]


@dataclass(frozen=True)
class JudgmentRecord:
    id: str
    principle_id: str
    order: str
    prob_x: float


def compute(pairs: list[PairRecord], judgments: dict[str, JudgmentRecord]) -> dict[str, Any]:
    """Every figure of the report from plain records (no database, no plotting)."""
    statuses: dict[str, int] = {}
    for p in pairs:
        statuses[p.status] = statuses.get(p.status, 0) + 1
    consistent = judged = 0
    scatter: list[tuple[float, float]] = []
    per_principle: dict[str, dict[str, float]] = {}
    p_a: list[float] = []
    for p in pairs:
        js = [judgments[k] for k in p.judgments if k in judgments]
        xy = [j.prob_x for j in js if j.order == "xy"]
        yx = [j.prob_x for j in js if j.order == "yx"]
        p_a += xy + [1.0 - v for v in yx]
        if xy and yx:
            m_xy, m_yx = sum(xy) / len(xy), sum(yx) / len(yx)
            judged += 1
            consistent += judge.orders_agree(m_xy, m_yx)
            scatter.append((m_xy, m_yx))
        by_principle: dict[str, list[float]] = {}
        for j in js:
            by_principle.setdefault(j.principle_id, []).append(j.prob_x)
            st = per_principle.setdefault(j.principle_id,
                                          {"judgments": 0, "agree": 0, "pairs": 0, "pair_agree": 0})
            st["judgments"] += 1
            st["agree"] += judge.winner(j.prob_x) == p.chosen
        for pid, probs in by_principle.items():  # the principle's verdict with both orders averaged
            st = per_principle[pid]
            st["pairs"] += 1
            st["pair_agree"] += judge.winner(sum(probs) / len(probs)) == p.chosen
    edges = [0.5 + i * 0.5 / BINS for i in range(BINS + 1)]
    hist = [0] * BINS
    for p in pairs:  # the epsilon puts 0.7 in [0.70, 0.75), not in [0.65, 0.70) by rounding error
        hist[min(max(int((p.label_prob - 0.5) * 2 * BINS + 1e-9), 0), BINS - 1)] += 1
    return {
        "pairs": len(pairs),
        "status": statuses,
        "ties": statuses.get("tie", 0),
        "position_inconsistent": statuses.get("position-inconsistent", 0),
        "position_consistency": consistent / judged if judged else None,
        "pairs_with_both_orders": judged,
        "judgments": sum(len(p.judgments) for p in pairs),
        "mean_p_a": sum(p_a) / len(p_a) if p_a else None,  # 0.5 = no preference for the (A) slot
        "share_a": sum(v > 0.5 for v in p_a) / len(p_a) if p_a else None,
        "mean_label_prob": sum(p.label_prob for p in pairs) / len(pairs) if pairs else None,
        "label_prob_hist": {"edges": edges, "counts": hist},
        "order_means": scatter,
        "per_principle": {pid: {"judgments": int(st["judgments"]), "pairs": int(st["pairs"]),
                                "agreement": st["agree"] / st["judgments"] if st["judgments"] else None,
                                "averaged_agreement": st["pair_agree"] / st["pairs"] if st["pairs"] else None}
                          for pid, st in sorted(per_principle.items())},
    }


def records(pairs: Iterable[PreferencePair], judgments: Iterable[Judgment],
            ) -> tuple[list[PairRecord], dict[str, JudgmentRecord]]:
    """Store rows of AI pairs and their judgments as the plain records `compute` reads."""
    out = []
    for r in pairs:
        x_id = r.details.get("x_id") or min(r.chosen_id, r.rejected_id)
        out.append(PairRecord(r.id, r.status, r.label_prob, "x" if r.chosen_id == x_id else "y",
                              tuple(r.details.get("judgments", []))))
    return out, {j.id: JudgmentRecord(j.id, j.principle_id, j.order, j.prob_x) for j in judgments}
