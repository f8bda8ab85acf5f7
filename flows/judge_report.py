"""How trustworthy are the AI labels? Position consistency, label spread, principle agreement.

    cai judge-report --constitution harmless --out reports/judge

Reads the AI-labelled pairs (method "ai") and their judgments from the store. A judge that
follows the slot rather than the content shows it here: low position consistency (the two
orders point to different winners), mean P(A) far from 0.5, and principles that agree with
the ensemble only about half the time. Writes PNG plots and `figures.json` to the out dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from constitution.load import split_ref
from flows import judge
from flows.common import UserError
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


def load(session: Session, constitution: str | None = None, judge_model: str | None = None,
         ) -> tuple[list[PairRecord], dict[str, JudgmentRecord]]:
    """AI pairs (optionally of NAME or NAME@VERSION, and one judge) with their judgments."""
    stmt = select(PreferencePair).where(PreferencePair.method == "ai")
    name, version = split_ref(constitution) if constitution else (None, None)
    if name:
        stmt = stmt.where(PreferencePair.constitution == name)
    if version:
        stmt = stmt.where(PreferencePair.constitution_version.startswith(version))
    if judge_model:
        stmt = stmt.where(PreferencePair.judge_model == judge_model)
    rows = list(session.exec(stmt))
    if not rows:
        which = " ".join(filter(None, [f"constitution {constitution}" if constitution else "",
                                       f"judge {judge_model}" if judge_model else ""])) or "any constitution"
        raise UserError(f"no AI-labelled pairs in the store for {which}; run `cai label` first")
    pairs = []
    for r in rows:
        x_id = r.details.get("x_id") or min(r.chosen_id, r.rejected_id)
        pairs.append(PairRecord(r.id, r.status, r.label_prob, "x" if r.chosen_id == x_id else "y",
                                tuple(r.details.get("judgments", []))))
    keys = sorted({k for p in pairs for k in p.judgments})
    judgments: dict[str, JudgmentRecord] = {}
    for i in range(0, len(keys), 500):
        for j in session.exec(select(Judgment).where(Judgment.id.in_(keys[i:i + 500]))):
            judgments[j.id] = JudgmentRecord(j.id, j.principle_id, j.order, j.prob_x)
    return pairs, judgments


def plot(fig: dict[str, Any], out: Path) -> list[Path]:
    """Three PNGs: label-probability histogram, order-mean scatter, per-principle agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    f, ax = plt.subplots(figsize=(6, 4))
    edges, hist = fig["label_prob_hist"]["edges"], fig["label_prob_hist"]["counts"]
    ax.bar(edges[:-1], hist, width=edges[1] - edges[0], align="edge", edgecolor="black")
    ax.set(xlabel="label probability P(chosen better)", ylabel="pairs",
           title=f"{fig['pairs']} AI-labelled pairs")
    paths.append(out / "label_prob_hist.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)

    f, ax = plt.subplots(figsize=(5, 5))
    if fig["order_means"]:
        xs, ys = zip(*fig["order_means"], strict=True)
        ax.scatter(xs, ys, s=12, alpha=0.6)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean P(x better), x shown as (A)",
           ylabel="mean P(x better), x shown as (B)")
    pc = fig["position_consistency"]
    ax.set_title("position consistency " + (f"{pc:.0%}" if pc is not None else "n/a")
                 + " (consistent pairs: lower-left and upper-right)", fontsize=9)
    paths.append(out / "position_consistency.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)

    f, ax = plt.subplots(figsize=(7, 0.4 * max(len(fig["per_principle"]), 3) + 1))
    names = list(fig["per_principle"])
    ax.barh(names, [fig["per_principle"][n]["averaged_agreement"] or 0 for n in names],
            label="both orders averaged")
    ax.scatter([fig["per_principle"][n]["agreement"] or 0 for n in names], names, color="black", zorder=3,
               label="single judgments")
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set(xlim=(0, 1), xlabel="agreement with the pair's final label")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(out / "principle_agreement.png")
    f.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(f)
    return paths


def write(fig: dict[str, Any], out: Path) -> list[Path]:
    paths = plot(fig, out)
    (out / "figures.json").write_text(json.dumps(fig, indent=2) + "\n", encoding="utf-8")
    return paths + [out / "figures.json"]


def render(fig: dict[str, Any], console, title: str = "judge report") -> None:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    t = Table("figure", "value", title=title)
    t.add_row("AI-labelled pairs", str(fig["pairs"]))
    for status, n in sorted(fig["status"].items()):
        t.add_row(f"  status {status}", str(n))
    t.add_row("judgments", str(fig["judgments"]))
    t.add_row("position consistency",
              f"{pct(fig['position_consistency'])} of {fig['pairs_with_both_orders']} pairs")
    t.add_row("mean P(A) (0.5 = no slot bias)", num(fig["mean_p_a"]))
    t.add_row("judgments picking (A)", pct(fig["share_a"]))
    t.add_row("mean label probability", num(fig["mean_label_prob"]))
    console.print(t)
    h = Table("label probability", "pairs", title="label-probability histogram")
    edges = fig["label_prob_hist"]["edges"]
    for i, n in enumerate(fig["label_prob_hist"]["counts"]):
        h.add_row(f"{edges[i]:.2f}-{edges[i + 1]:.2f}", str(n))
    console.print(h)
    p = Table("principle", "judgments", "agreement", "both orders averaged",
              title="agreement with the ensemble")
    for pid, st in fig["per_principle"].items():
        p.add_row(pid, str(st["judgments"]), pct(st["agreement"]), pct(st["averaged_agreement"]))
    console.print(p)
