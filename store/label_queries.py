"""The store reads of `cai label` (flows/label.py); the rules that use them are in cai/rl_cai.py.

    responses_for(session, prompt_ids, "smollm2-135m", ["initial"])      # stored replies to pair
    pair_counts(session, pair_ids, judgment_ids)                        # pairs by status, judgments
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, select

from store.models import Judgment, PreferencePair, Response
from store.queries import CHUNK, existing_ids


def responses_for(session: Session, prompt_ids: list[str], model: str, kinds: list[str],
                  constitution: str | None = None) -> list[Response]:
    """`model`'s stored responses of `kinds` to these prompts; with `constitution`, only those made
    under that name (revisions belong to a constitution)."""
    if not kinds:
        return []
    where = [Response.constitution == constitution] if constitution is not None else []
    out: list[Response] = []
    for i in range(0, len(prompt_ids), CHUNK):
        out += session.exec(select(Response).where(Response.prompt_id.in_(prompt_ids[i:i + CHUNK]),
                                                   Response.kind.in_(kinds), Response.model == model, *where))
    return out


def responses_done(session: Session, keys: list[str]) -> set[str]:
    return existing_ids(session, Response.id, keys)


def judgments_done(session: Session, keys: list[str]) -> set[str]:
    return existing_ids(session, Judgment.id, keys)


def pairs_done(session: Session, keys: list[str]) -> set[str]:
    return existing_ids(session, PreferencePair.id, keys)


def pair_counts(session: Session, ids: list[str], judgment_ids: list[str] | None) -> dict[str, int]:
    """What the store holds of these pairs, by status and in all ("pairs"), with how many of
    `judgment_ids` exist ("judgments"; None: pairs no judge labels, best-of-n) and "candidate_pairs"."""
    out = {"pairs": 0, "ok": 0, "tie": 0, "position-inconsistent": 0}
    if judgment_ids is None:
        out |= {"judgments": 0, "candidate_pairs": len(ids)}
    for i in range(0, len(ids), CHUNK):
        for status, n in session.exec(select(PreferencePair.status, func.count()).where(
                PreferencePair.id.in_(ids[i:i + CHUNK])).group_by(PreferencePair.status)):
            out[status] = out.get(status, 0) + n
            out["pairs"] += n
    if judgment_ids is not None:
        out["judgments"] = len(judgments_done(session, judgment_ids))
        out["candidate_pairs"] = len(ids)
    return out
