"""Which stored pairs `cai export` keeps and which row of which split each becomes: the rules, no reads.

    cai export --constitution harmless@3f2a9c1b --method ai --min-margin 0.2 --out exports/h

flows/export.py reads the store (store/export_queries.py) and applies these in order:
`pick_version` (NAME: its newest version with pairs; NAME@PREFIX: the one version it names),
`filter_pairs` (status gates and options, each removal counted for the card), `apply_reviews`
(what people's verdicts keep, cai/review.py), `plan_splits` (which pair gives a row of which split)
and `prefs_row` / `sft_row` (the rows, shaped as cai/dataset_schema.py declares).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cai import dataset_schema as schema
from cai import review
from cai.errors import UserError
from store.keys import naive_utc
from store.models import PreferencePair

Plan = dict[str, list[PreferencePair]]  # split -> the pairs whose rows it holds, in id order


@dataclass
class Selection:
    """The selected pairs' rows (ids, labels, provenance: no texts). Texts are read a page at a time
    while the data files are written, so an export never holds the store's texts."""

    name: str
    version: str
    pairs: list[PreferencePair]  # sorted by id
    available: int  # pairs of this version before any filter
    removed: dict[str, int] = field(default_factory=dict)  # filter -> pairs it removed
    review: dict[str, Any] = field(default_factory=dict)  # people's verdicts on the pairs (cai/review.py)


def pick_version(ref: str, name: str, wanted: str | None, pair_dates: dict[str, datetime],
                 seen: dict[str, datetime]) -> str:
    """The version `ref` means among those with pairs (`pair_dates`: version -> newest pair): the one
    `wanted` is a unique prefix of, or without one the newest by when the store first saw it (`seen`)."""
    if wanted:
        match = sorted(v for v in pair_dates if v.startswith(wanted))
        if len(match) != 1:
            problem = "no pairs for that version" if not match else "ambiguous version prefix"
            raise UserError(f"constitution {ref}: {problem} (versions of {name!r} with pairs: "
                            f"{', '.join(sorted(pair_dates))})")
        return match[0]
    # a version the store never recorded (should not happen) is dated by its newest pair
    return max(pair_dates, key=lambda v: (naive_utc(seen.get(v, pair_dates[v])), v))


def filter_pairs(name: str, version: str, available: int, latest: tuple[list[PreferencePair], int], config: Any,
                 tagged: set[str], bad: set[str]) -> Selection:
    """The pairs an ExportConfig (flows/configs.py) keeps of `latest` (store.pairs.latest_per_response_pair:
    the kept pairs and how many older labels it dropped), each removal counted on the card. `tagged`: the
    prompts carrying config.tags; `bad`: quarantined item keys (empty when they are included)."""
    pairs, superseded = latest
    sel = Selection(name, version, [], available=available)
    # before the status filters: a relabelled pair is judged by its latest label, not its best one
    if superseded:
        sel.removed["superseded (an older label of the same two responses)"] = superseded
    since = naive_utc(config.since) if config.since else None
    until = naive_utc(config.until) if config.until else None
    statuses = {"ok"} | ({"tie"} if config.include_ties else set()) | (
        {"position-inconsistent"} if config.include_inconsistent else set())
    # every status left out is counted on its own: the card says what each quality gate removed
    for status in sorted({p.status for p in pairs} - statuses):
        sel.removed[f"status {status}"] = sum(p.status == status for p in pairs)
    pairs = [p for p in pairs if p.status in statuses]
    filters: list[tuple[str, Callable[[PreferencePair], bool] | None]] = [
        (f"method {','.join(config.methods)}",
         (lambda p: p.method in config.methods) if config.methods else None),
        (f"min-label-prob {config.min_label_prob}",
         (lambda p: p.label_prob >= config.min_label_prob) if config.min_label_prob is not None else None),
        (f"min-margin {config.min_margin}",
         (lambda p: abs(p.label_prob - 0.5) >= config.min_margin) if config.min_margin is not None else None),
        (f"since {config.since}", (lambda p: naive_utc(p.created_at) >= since) if since else None),
        (f"until {config.until}", (lambda p: naive_utc(p.created_at) < until) if until else None),
        (f"tag {','.join(config.tags)}", (lambda p: p.prompt_id in tagged) if config.tags else None),
        ("quarantined", (lambda p: not ({p.id, p.chosen_id, p.rejected_id} & bad)) if bad else None),
    ]
    for label, keep in filters:
        if keep is None:
            continue
        kept = [p for p in pairs if keep(p)]
        if len(kept) < len(pairs):
            sel.removed[label] = len(pairs) - len(kept)
        pairs = kept
    sel.pairs = pairs
    return sel


def apply_reviews(sel: Selection, verdicts: list[review.Verdict], mode: str, people_order: bool) -> Selection:
    """The pairs `--reviewed MODE` keeps of `sel` given people's `verdicts` on them (a pair people flipped
    as a detached copy in their order when `people_order`), and the people's figures for the card."""
    ids = [p.id for p in sel.pairs]
    decision = review.decide(ids, verdicts, mode, people_order)
    kept = [p if p.id in decision.keep else review.flipped_copy(p, decision.flip[p.id])
            for p in sel.pairs if p.id in decision.keep or p.id in decision.flip]
    sel.review = {"mode": mode, "people_order": people_order, "pairs_selected": len(sel.pairs),
                  "flipped": len(decision.flip), "dropped": dict(decision.dropped),
                  "stats": review.public(review.compute(verdicts))}
    if mode != "any":
        for verdict, n in sorted(sel.review["dropped"].items()):
            sel.removed[f"reviewed {mode} ({verdict})"] = n
    sel.pairs = kept
    return sel


def nothing_left(sel: Selection) -> str:
    """What to tell a person whose filters left no pair."""
    why = "; ".join(f"{k} removed {n}" for k, n in sel.removed.items()) or "no filter removed any"
    return (f"nothing to export for {sel.name}@{sel.version}: {sel.available} pairs stored, none left "
            f"after the filters ({why}); loosen --method/--tag/--min-label-prob/--min-margin/"
            "--since/--until/--reviewed or add --include-ties/--include-inconsistent/--include-quarantined")


def plan_splits(pairs: list[PreferencePair], held_out: set[str]) -> Plan:
    """Which pair gives a row of which split, sorted by id: everything about the rows but their texts.
    `held_out`: the prompts of the test splits (store/split.py).

    Every selected pair is a *_prefs row; a pair whose chosen reply is one to teach
    (dataset_schema.teaches_reply) is also a *_sft row, once per chosen reply (pairs of one prompt can
    share a final revision, paired with different rejected answers: SFT wants it once).
    """
    plan: Plan = {name: [] for name in schema.SPLITS}
    sft_seen: set[str] = set()
    for p in sorted(pairs, key=lambda p: p.id):
        half = "test" if p.prompt_id in held_out else "train"
        plan[f"{half}_prefs"].append(p)
        if schema.teaches_reply(p.method) and p.chosen_id not in sft_seen:
            sft_seen.add(p.chosen_id)
            plan[f"{half}_sft"].append(p)
    return plan


def provenance(p: PreferencePair) -> dict[str, Any]:
    return {"id": p.id, "prompt_id": p.prompt_id, "method": p.method, "status": p.status,
            "label_prob": float(p.label_prob), "principle_ids": [str(x) for x in p.principle_ids or []],
            "constitution": p.constitution, "constitution_version": p.constitution_version,
            "policy_model": p.policy_model, "judge_model": p.judge_model, "run_id": p.run_id}


def prefs_row(p: PreferencePair, turns: list[dict[str, Any]], texts: dict[str, str], cut: set[str]) -> dict[str, Any]:
    """A *_prefs row: the prompt's `turns`, the two replies (`texts` by response id; `cut`: the ids
    the token cap stopped) and the pair's provenance."""
    return {"prompt": schema.messages(turns), "chosen": schema.assistant(texts[p.chosen_id]),
            "rejected": schema.assistant(texts[p.rejected_id]), "chosen_id": p.chosen_id,
            "rejected_id": p.rejected_id, "chosen_cut": p.chosen_id in cut,
            "rejected_cut": p.rejected_id in cut, **provenance(p)}


def sft_row(p: PreferencePair, turns: list[dict[str, Any]], texts: dict[str, str], cut: set[str]) -> dict[str, Any]:
    """A *_sft row: the prompt's turns with the chosen reply as the assistant turn, and provenance."""
    return {"messages": schema.messages(turns) + schema.assistant(texts[p.chosen_id]), "response_id": p.chosen_id,
            "response_cut": p.chosen_id in cut, **provenance(p)}
