"""People's verdicts on the factory's pairs: what a verdict means, agreement figures, and the
JSONL record shape other review tools read (`cai review`, `cai review stats`, export/import).

    cai review                      # the page (flows/review.py); verdicts are store.Review rows
    cai review stats                # compute(...) below, rendered by flows/cli/review.py

Pure functions over plain records; the store queries are in store/reviews.py.

A verdict is kept in the pair's terms: `chosen` (the person prefers the reply the factory chose),
`rejected` (they prefer the other one: the label is flipped), `tie`, `both-bad` or `skip`. Each
person's latest verdict on a pair counts, and a skip is no verdict. Agreement with the factory is
the share of a person's decisive verdicts (chosen or rejected) that name the factory's choice; a
tie or both-bad says the pair teaches nothing, so it is counted beside the agreement, not in it.
Intervals are 95 % Wilson score intervals, one verdict one trial.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cai.intervals import wilson
from store.keys import content_hash
from store.models import PreferencePair, Review

VERDICTS = ("chosen", "rejected", "tie", "both-bad", "skip")
CHOICES = ("left", "right", "tie", "both-bad", "skip")  # what a person presses on the page
DECISIVE = ("chosen", "rejected")
SIDES = ("chosen", "rejected")  # which of the pair's replies was shown on the left
REVIEWED_MODES = ("any", "not-rejected", "agreed")
CALIBRATION_BINS = 10  # bins of the judge's P(chosen better) over [0, 1]
NO_JUDGE = "(no judge)"  # revision, contrastive and helpful pairs: chosen by construction, not by a model


def other(side: str) -> str:
    return "rejected" if side == "chosen" else "chosen"


def verdict_for(choice: str, left: str) -> str:
    """The pair-terms verdict of what a person pressed, given which reply was on the left."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r}: expected one of {', '.join(CHOICES)}")
    if left not in SIDES:
        raise ValueError(f"left {left!r}: expected chosen or rejected")
    if choice == "left":
        return left
    if choice == "right":
        return other(left)
    return choice


def choice_for(verdict: str, left: str) -> str:
    """The side a person pressed for a verdict (the inverse of verdict_for)."""
    if verdict in DECISIVE:
        return "left" if verdict == left else "right"
    return verdict


def review_key(pair_id: str, reviewer: str, created_at: datetime | str, verdict: str, left: str,
               note: str | None, source: str = "page") -> str:
    """store.Review.id: two clicks at different times are two rows; the same import twice is one."""
    when = created_at.isoformat() if isinstance(created_at, datetime) else created_at
    return content_hash("review", pair_id, reviewer, when, verdict, left, note or "", source)


def review_row(pair_id: str, reviewer: str, verdict: str, left: str, note: str | None, created_at: datetime,
               source: str = "page", ai_shown: bool = False) -> Review:
    """A verdict as its store.Review row, keyed by review_key (the page's and an import's alike)."""
    return Review(id=review_key(pair_id, reviewer, created_at, verdict, left, note, source), pair_id=pair_id,
                  reviewer=reviewer, verdict=verdict, left=left, note=note, ai_shown=ai_shown, source=source,
                  created_at=created_at)


def check_reviewer(name: str) -> str:
    """A reviewer name as stored: 1-64 printable characters, surrounding spaces dropped."""
    name = (name or "").strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise ValueError(f"reviewer {name!r}: expected a name of 1 to 64 printable characters")
    return name


# --- records and the latest verdict per person --------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """One stored verdict with the facts of its pair that agreement is broken down by."""

    pair_id: str
    reviewer: str
    verdict: str
    left: str
    created_at: datetime
    ai_shown: bool = False
    method: str = ""
    status: str = ""
    principle_ids: tuple[str, ...] = ()
    judge_model: str | None = None
    label_prob: float = 1.0
    note: str | None = None


def verdict_from_row(row: Sequence[Any]) -> Verdict:
    """A Verdict from a row in store.reviews.VERDICT_COLUMNS order."""
    pair_id, reviewer, verdict, left, created_at, ai_shown, method, status, principles, judge, label, note = row
    return Verdict(pair_id, reviewer, verdict, left, created_at, bool(ai_shown), method, status,
                   tuple(str(p) for p in principles or ()), judge, float(label), note)


def latest(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Each person's latest verdict per pair, skips left out (a skip is no verdict), sorted by pair."""
    best: dict[tuple[str, str], Verdict] = {}
    for v in verdicts:
        if v.verdict == "skip":
            continue
        key = (v.pair_id, v.reviewer)
        cur = best.get(key)
        if cur is None or (v.created_at, v.verdict) > (cur.created_at, cur.verdict):
            best[key] = v
    return sorted(best.values(), key=lambda v: (v.pair_id, v.reviewer))


def consensus(verdicts: Sequence[str]) -> str | None:
    """The people's verdict on one pair: the strict majority of their verdicts, `disputed` without
    one, None when nobody gave a verdict."""
    counts = Counter(v for v in verdicts if v != "skip")
    if not counts:
        return None
    top, n = counts.most_common(1)[0]
    return top if n * 2 > sum(counts.values()) else "disputed"


def consensus_by_pair(verdicts: Iterable[Verdict]) -> dict[str, tuple[str, float]]:
    """pair id -> (the people's verdict, share of its people preferring the factory's rejected reply)."""
    per: dict[str, list[str]] = {}
    for v in latest(verdicts):
        per.setdefault(v.pair_id, []).append(v.verdict)
    return {pid: (consensus(vs) or "disputed", vs.count("rejected") / len(vs)) for pid, vs in per.items()}


# --- using the verdicts: which pairs export and training keep ---------------------------------------

@dataclass
class Decision:
    keep: set[str] = field(default_factory=set)  # pair ids kept as they are
    flip: dict[str, float] = field(default_factory=dict)  # pair id -> share of people preferring its rejected
    dropped: Counter = field(default_factory=Counter)  # the people's verdict -> pairs it removed


def decide(pair_ids: Iterable[str], verdicts: Iterable[Verdict], mode: str, people_order: bool) -> Decision:
    """Which pairs to keep, flip or drop under `--reviewed MODE`.

    any: every pair. not-rejected: drop the pairs people judged flipped, tied or both bad
    (unreviewed and disputed pairs stay). agreed: only pairs people confirmed. With
    people_order, a pair people flipped is kept in their order instead of dropped.
    """
    if mode not in REVIEWED_MODES:
        raise ValueError(f"reviewed {mode!r}: expected one of {', '.join(REVIEWED_MODES)}")
    people = consensus_by_pair(verdicts)
    out = Decision()
    for pid in pair_ids:
        verdict, share = people.get(pid, (None, 0.0))
        if verdict == "rejected" and people_order:
            out.flip[pid] = share
        elif mode == "any" or verdict == "chosen" or (mode == "not-rejected" and verdict in (None, "disputed")):
            out.keep.add(pid)
        else:
            out.dropped[verdict or "not reviewed"] += 1
    return out


def flipped_copy(pair: PreferencePair, share: float) -> PreferencePair:
    """A detached copy of `pair` in the people's order (never added to a session: the stored pair
    stays as it is). Its label is the share of its people preferring the new chosen reply."""
    data = pair.model_dump()
    data.update(chosen_id=pair.rejected_id, rejected_id=pair.chosen_id, label_prob=share,
                details={**(pair.details or {}), "people_order": True, "judge_label_prob": pair.label_prob})
    return PreferencePair(**data)


# --- agreement figures ------------------------------------------------------------------------------

def share(k: int, n: int) -> dict[str, Any]:
    """k of n with its rate and 95 % Wilson interval (rate and bounds None when n = 0)."""
    lo, hi = wilson(k, n) if n else (None, None)
    return {"k": k, "n": n, "rate": k / n if n else None, "low": lo, "high": hi}


def _group(vs: list[Verdict]) -> dict[str, Any]:
    decisive = [v for v in vs if v.verdict in DECISIVE]
    counts = Counter(v.verdict for v in vs)
    return {"verdicts": len(vs), "pairs": len({v.pair_id for v in vs}), "tie": counts["tie"],
            "both_bad": counts["both-bad"], "agreement": share(sum(v.verdict == "chosen" for v in decisive),
                                                               len(decisive))}


def _by(vs: list[Verdict], keys) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Verdict]] = {}
    for v in vs:
        for k in keys(v):
            groups.setdefault(k, []).append(v)
    return {k: _group(g) for k, g in sorted(groups.items())}


def human_human(vs: list[Verdict]) -> dict[str, Any]:
    """Agreement between people on the pairs two or more of them reviewed: every two people's latest
    verdicts on one pair are one comparison (all four verdicts count, a tie matches only a tie)."""
    per: dict[str, list[str]] = {}
    for v in vs:
        per.setdefault(v.pair_id, []).append(v.verdict)
    agree = total = 0
    for verdicts in per.values():
        for i in range(len(verdicts)):
            for j in range(i + 1, len(verdicts)):
                total += 1
                agree += verdicts[i] == verdicts[j]
    return {"pairs": sum(len(x) > 1 for x in per.values()), **share(agree, total)}


def calibration(vs: list[Verdict], bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """The judge's P(chosen better), binned, against the share of people's decisive verdicts that agree
    with it (pairs with a judge model only); a calibrated judge sits on the diagonal."""
    per: dict[int, list[Verdict]] = {}
    for v in vs:
        if v.judge_model and v.verdict in DECISIVE:
            per.setdefault(min(max(int(v.label_prob * bins), 0), bins - 1), []).append(v)
    return [{"bin": [b / bins, (b + 1) / bins], "mean_label": sum(v.label_prob for v in g) / len(g),
             **share(sum(v.verdict == "chosen" for v in g), len(g))} for b, g in sorted(per.items())]


def compute(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """Every agreement figure of `cai review stats`, the report and the card, from stored verdicts."""
    rows = list(verdicts)
    vs = latest(rows)
    decisive = [v for v in vs if v.verdict in DECISIVE]
    return {
        "rows": len(rows),  # stored rows, skips and superseded verdicts included
        "skips": sum(v.verdict == "skip" for v in rows),
        "reviewers": sorted({v.reviewer for v in vs}),
        "overall": _group(vs),
        "by_method": _by(vs, lambda v: [v.method]),
        "by_principle": _by(vs, lambda v: list(v.principle_ids) or ["(none)"]),
        "by_judge": _by(vs, lambda v: [v.judge_model or NO_JUDGE]),
        "by_status": _by(vs, lambda v: [v.status]),
        "blind": _group([v for v in vs if not v.ai_shown])["agreement"],  # verdicts given before the label was shown
        "human_human": human_human(vs),
        "calibration": calibration(vs),
        # people's own position bias: the share of decisive verdicts that picked the left reply
        "picked_left": share(sum(v.verdict == v.left for v in decisive), len(decisive)),
    }


# --- the dataset card --------------------------------------------------------------------------------

def public(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures without the reviewers' names (what a published card and manifest may carry)."""
    return {**stats, "reviewers": len(stats["reviewers"])}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def card_lines(review: dict[str, Any] | None) -> list[str]:
    """The card's paragraph on people's review of the exported pairs (flows/export.py collects it)."""
    if not review:
        return []
    st, selected = review["stats"], review["pairs_selected"]
    out = ["", "## People's review", ""]
    if not st["overall"]["pairs"]:
        out.append(f"No person checked any of the {selected} pairs selected for this export (`cai review` "
                   "shows pairs to people and stores their verdicts).")
    else:
        a, o = st["overall"]["agreement"], st["overall"]
        line = (f"People checked {o['pairs']} of the {selected} pairs selected ({o['verdicts']} verdicts from "
                f"{st['reviewers']} {'person' if st['reviewers'] == 1 else 'people'}, `cai review`). ")
        if a["n"]:
            line += (f"Where they preferred one reply, they agreed with the factory's label in {a['k']} of {a['n']} "
                     f"verdicts ({_pct(a['rate'])}, 95 % Wilson interval {_pct(a['low'])} to {_pct(a['high'])}); ")
        line += f"{o['tie']} verdicts were ties and {o['both_bad']} said both replies were bad."
        hh = st["human_human"]
        if hh["n"]:
            line += (f" On the {hh['pairs']} pairs two or more people reviewed, they gave the same verdict in "
                     f"{hh['k']} of {hh['n']} comparisons ({_pct(hh['rate'])}).")
        out.append(line)
    mode, flipped = review["mode"], review["flipped"]
    if mode != "any" or flipped:
        removed = ", ".join(f"{k} {n}" for k, n in sorted(review["dropped"].items())) or "none"
        out += ["", f"Selected with `--reviewed {mode}`: pairs removed by the people's verdict: {removed}; "
                f"{flipped} pairs people flipped are exported in their order (chosen and rejected swapped, "
                "`label_prob` the share of people preferring the new chosen reply)."]
    return out + [""]


# --- JSONL records for other review tools (the shape of an Argilla record's to_dict) -----------------

QUESTION = "preference"  # a label question: which reply is better
NOTE_QUESTION = "note"
LABELS = ("response1", "response2", "tie", "both-bad")


def first_side(pair_id: str) -> str:
    """Which of the pair's replies is `response1` in a record: a fixed coin per pair, so another tool's
    reviewers see the factory's choice first only half the time."""
    return "chosen" if int(content_hash("review-record-order", pair_id)[:8], 16) % 2 == 0 else "rejected"


def to_record(pair: PreferencePair, messages: list[dict[str, Any]], texts: dict[str, str],
              reviews: Iterable[Verdict] = ()) -> dict[str, Any]:
    """One pair as a record: fields (prompt turns, two replies), metadata (what the factory knows),
    the factory's label as a suggestion (value, score, agent) and people's latest verdicts as responses."""
    first = first_side(pair.id)
    ids = {"chosen": pair.chosen_id, "rejected": pair.rejected_id}
    label = {first: "response1", other(first): "response2"}
    responses: dict[str, list[dict[str, Any]]] = {}
    for v in latest(reviews):
        value = label[v.verdict] if v.verdict in DECISIVE else v.verdict
        responses.setdefault(QUESTION, []).append({"value": value, "user_id": v.reviewer, "status": "submitted"})
        if v.note:
            responses.setdefault(NOTE_QUESTION, []).append({"value": v.note, "user_id": v.reviewer,
                                                            "status": "submitted"})
    return {
        "id": pair.id,
        "fields": {"prompt": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
                   "response1": texts[ids[first]], "response2": texts[ids[other(first)]]},
        "metadata": {"response1_id": ids[first], "response2_id": ids[other(first)], "method": pair.method,
                     "status": pair.status, "principle_ids": list(pair.principle_ids or []),
                     "constitution": f"{pair.constitution}@{pair.constitution_version}",
                     "judge_model": pair.judge_model, "policy_model": pair.policy_model},
        "suggestions": {QUESTION: {"value": label["chosen"], "score": float(pair.label_prob),
                                   "agent": pair.judge_model or f"cai-factory:{pair.method}"}},
        "responses": responses,
        "vectors": {},
    }


@dataclass(frozen=True)
class Imported:
    """One verdict read from a record, in the pair's terms."""

    pair_id: str
    reviewer: str
    verdict: str
    left: str  # response1's reply: what another tool shows first
    note: str | None


def from_record(rec: Any, chosen_ids: dict[str, str]) -> list[Imported]:
    """The people's verdicts in one record. `chosen_ids`: pair id -> its chosen response id, for the
    pairs the store has. A ValueError says what is wrong with the record."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object (a record), got {type(rec).__name__}")
    pid = rec.get("id")
    if not isinstance(pid, str) or pid not in chosen_ids:
        raise ValueError(f"id {pid!r}: no such preference pair in the store")
    meta = rec.get("metadata") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("response1_id"), str):
        raise ValueError("metadata.response1_id is missing: records must come from `cai review export`")
    left = "chosen" if meta["response1_id"] == chosen_ids[pid] else "rejected"
    responses = rec.get("responses") or {}
    if not isinstance(responses, dict):
        raise ValueError("responses: expected an object of question name -> list of responses")
    notes: dict[str, str] = {}
    for r in responses.get(NOTE_QUESTION) or []:
        if isinstance(r, dict) and isinstance(r.get("value"), str) and r.get("value").strip():
            notes[str(r.get("user_id"))] = r["value"]
    out = []
    for r in responses.get(QUESTION) or []:
        if not isinstance(r, dict):
            raise ValueError(f"responses.{QUESTION}: expected objects with value and user_id")
        if r.get("status", "submitted") == "draft":
            continue  # not given yet
        user = check_reviewer(str(r.get("user_id") or ""))
        value = r.get("value")
        if r.get("status") == "discarded":
            verdict = "skip"
        elif value in ("response1", "response2"):
            verdict = left if value == "response1" else other(left)
        elif value in ("tie", "both-bad"):
            verdict = value
        else:
            raise ValueError(f"responses.{QUESTION}: value {value!r}: expected one of {', '.join(LABELS)}")
        out.append(Imported(pid, user, verdict, left, notes.get(str(r.get("user_id")))))
    return out
