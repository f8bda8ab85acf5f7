"""Store queries behind `cai review`: the paged queue of pairs, one pair with everything the factory
knows about it, the verdicts (store.Review) with their pairs' facts, and adding verdicts; the queue's
filter to and from the page's query parameters.

Every query is paged or reads only the columns it needs, so the page answers on a store of 100k
pairs without loading them: the queue is keyset-paged in pair id order (ids are content hashes,
so that order is a fair shuffle of the pairs, not the order they were made in).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import String, cast, exists, func
from sqlmodel import Session, col, select

from store.models import ConstitutionVersion, Judgment, PreferencePair, Prompt, PromptTag, Response, Review
from store.upsert import insert_ignore

CHUNK = 500  # ids per IN (...) clause
# todo: pairs this reviewer has not judged; unreviewed: pairs nobody judged; all; reviewed: judged by someone
QUEUES = ("todo", "unreviewed", "all", "reviewed")


@dataclass(frozen=True)
class QueueFilter:
    """Which pairs the queue shows. Empty strings and None mean "any"."""

    method: str = ""
    status: str = ""  # a status, or "gated" for every gated:<gate>
    principle: str = ""
    version: str = ""  # NAME@VERSION (a version prefix is enough) or NAME
    tag: str = ""  # prompt tag
    label_min: float | None = None  # the factory's P(chosen better), inclusive bounds
    label_max: float | None = None
    queue: str = "todo"
    reviewer: str = ""  # whose "todo" queue

    def where(self) -> list[Any]:
        P = PreferencePair
        out: list[Any] = []
        if self.method:
            out.append(P.method == self.method)
        if self.status == "gated":
            out.append(col(P.status).startswith("gated:"))
        elif self.status:
            out.append(P.status == self.status)
        if self.principle:
            # principle_ids is a JSON list of strings: its text holds the id in quotes
            out.append(cast(P.principle_ids, String).contains(f'"{self.principle}"', autoescape=True))
        if self.version:
            name, _, version = self.version.partition("@")  # constitution.load.split_ref: store/ imports none of ours
            out.append(P.constitution == name)
            if version:
                out.append(col(P.constitution_version).startswith(version, autoescape=True))
        if self.tag:
            out.append(exists().where(PromptTag.prompt_id == P.prompt_id, PromptTag.tag == self.tag))
        if self.label_min is not None:
            out.append(P.label_prob >= self.label_min)
        if self.label_max is not None:
            out.append(P.label_prob <= self.label_max)
        judged = exists().where(Review.pair_id == P.id, Review.verdict != "skip")
        if self.queue == "todo":  # a pair this person skipped comes round again
            out.append(~exists().where(Review.pair_id == P.id, Review.verdict != "skip",
                                       Review.reviewer == self.reviewer))
        elif self.queue == "unreviewed":
            out.append(~judged)
        elif self.queue == "reviewed":
            out.append(judged)
        return out


# the filter's fields that travel as the page's query parameters (its reviewer is the page's cookie)
FILTERS = ("method", "status", "principle", "version", "tag", "label_min", "label_max", "queue")


def filter_params(f: QueueFilter) -> dict[str, str]:
    """The filter as query parameters (the inverse of filter_from)."""
    return {"method": f.method, "status": f.status, "principle": f.principle, "version": f.version, "tag": f.tag,
            "label_min": "" if f.label_min is None else f"{f.label_min:g}",
            "label_max": "" if f.label_max is None else f"{f.label_max:g}", "queue": f.queue}


def _float(value: str | None, name: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number between 0 and 1, got {value!r}") from None
    if not 0 <= x <= 1:
        raise ValueError(f"{name}: expected a number between 0 and 1, got {value!r}")
    return x


def filter_from(params: dict[str, str], defaults: QueueFilter, reviewer: str) -> QueueFilter:
    """The queue filter a request names; parameters it leaves out keep the defaults `cai review` started with.
    ValueError names the parameter that is wrong."""
    f = replace(defaults, reviewer=reviewer)
    if not any(k in params for k in FILTERS):
        return f
    queue = params.get("queue") or defaults.queue
    if queue not in QUEUES:
        raise ValueError(f"queue: expected one of {', '.join(QUEUES)}, got {queue!r}")
    return replace(f, method=params.get("method", ""), status=params.get("status", ""),
                   principle=params.get("principle", ""), version=params.get("version", ""),
                   tag=params.get("tag", ""), label_min=_float(params.get("label_min"), "label_min"),
                   label_max=_float(params.get("label_max"), "label_max"), queue=queue)


def queue_page(session: Session, f: QueueFilter, after: str | None = None, limit: int = 50
               ) -> list[PreferencePair]:
    """Up to `limit` pairs matching `f` with ids after `after`, in id order."""
    stmt = select(PreferencePair).where(*f.where())
    if after:
        stmt = stmt.where(PreferencePair.id > after)
    return list(session.exec(stmt.order_by(PreferencePair.id).limit(limit)))


def next_pair(session: Session, f: QueueFilter, after: str | None = None) -> PreferencePair | None:
    """The next pair of the queue after `after`, wrapping round to the first."""
    page = queue_page(session, f, after, 1)
    if not page and after:
        page = queue_page(session, f, None, 1)
    return page[0] if page else None


def count(session: Session, f: QueueFilter) -> int:
    return session.exec(select(func.count()).select_from(PreferencePair).where(*f.where())).one()


def facets(session: Session) -> dict[str, list[str]]:
    """The values the queue's filters offer (grouped queries: no pair rows are loaded)."""
    P = PreferencePair
    principles: set[str] = set()
    for text in session.exec(select(cast(P.principle_ids, String)).distinct()):  # json has no = in PostgreSQL
        principles.update(str(i) for i in json.loads(text or "[]") or [])
    versions = sorted({f"{n}@{v}" for n, v in session.exec(select(P.constitution, P.constitution_version)
                                                           .distinct())})
    return {
        "method": sorted(session.exec(select(P.method).distinct())),
        "status": sorted(session.exec(select(P.status).distinct())),
        "principle": sorted(principles),
        "version": versions,
        "tag": sorted(session.exec(select(PromptTag.tag).distinct())),
    }


def pair_view(session: Session, pair_id: str) -> dict[str, Any] | None:
    """One pair with what the factory knows: prompt, both replies (text, gates, steering), the judge's
    judgments (both orders), the constitution's principle texts, prompt tags, and its reviews."""
    pair = session.get(PreferencePair, pair_id)
    if pair is None:
        return None
    prompt = session.get(Prompt, pair.prompt_id)
    replies = {}
    for side, rid in (("chosen", pair.chosen_id), ("rejected", pair.rejected_id)):
        row = session.exec(select(Response.text, Response.kind, Response.model, Response.quality,
                                  Response.steering, Response.finish_reason, Response.principle_id)
                           .where(Response.id == rid)).first()
        text, kind, model, quality, steering, finish, principle = row if row else ("", "", "", None, None, "", None)
        replies[side] = {"id": rid, "text": text, "kind": kind, "model": model, "quality": quality or {},
                         "steering": steering, "finish_reason": finish, "principle": principle}
    keys = [str(k) for k in (pair.details or {}).get("judgments", [])]
    judgments = [{"principle": j.principle_id, "order": j.order, "prob_x": j.prob_x,
                  "x_is_chosen": j.response_x_id == pair.chosen_id, "model": j.judge_model}
                 for j in session.exec(select(Judgment).where(col(Judgment.id).in_(keys[:CHUNK])))] if keys else []
    tags = sorted(session.exec(select(PromptTag.tag).where(PromptTag.prompt_id == pair.prompt_id)))
    reviews = list(session.exec(select(Review).where(Review.pair_id == pair.id).order_by(Review.created_at)))
    return {"pair": pair, "messages": prompt.messages if prompt else [],
            "category": prompt.category if prompt else None, "tags": tags, "replies": replies,
            "judgments": judgments, "reviews": reviews,
            "principles": principle_texts(session, pair.constitution, pair.constitution_version)}


def principle_texts(session: Session, name: str, version: str) -> dict[str, str]:
    """principle id -> its text (critique request, or its description) in that constitution version."""
    cv = session.exec(select(ConstitutionVersion.canonical).where(ConstitutionVersion.name == name,
                                                                  ConstitutionVersion.version == version)).first()
    try:
        data = json.loads(cv) if cv else {}
    except ValueError:
        return {}
    out = {}
    for p in data.get("principles", []) if isinstance(data, dict) else []:
        if isinstance(p, dict) and p.get("id"):
            out[str(p["id"])] = str(p.get("critique") or p.get("description") or p.get("text") or "")
    for p in data.get("preferences", []) if isinstance(data, dict) else []:
        if isinstance(p, dict) and p.get("id"):
            out.setdefault(str(p["id"]), str(p.get("question") or p.get("description") or p.get("text") or ""))
    return out


def add_reviews(session: Session, rows: Iterable[Review]) -> int:
    """Store verdicts (a row whose id is stored already is left as it is); returns how many were new."""
    return insert_ignore(session, Review, list(rows))


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


VERDICT_COLUMNS = (Review.pair_id, Review.reviewer, Review.verdict, Review.left, Review.created_at, Review.ai_shown,
                   PreferencePair.method, PreferencePair.status, PreferencePair.principle_ids,
                   PreferencePair.judge_model, PreferencePair.label_prob, Review.note)


def verdict_rows(session: Session, constitution: str | None = None, pair_ids: Iterable[str] | None = None
                 ) -> Iterator[tuple]:
    """Every stored verdict joined to its pair's facts (VERDICT_COLUMNS), for the given pairs or a
    constitution (NAME or NAME@VERSION prefix), or all of them; streamed."""
    base = select(*VERDICT_COLUMNS).join(PreferencePair, PreferencePair.id == Review.pair_id)
    if constitution:
        name, _, version = constitution.partition("@")  # constitution.load.split_ref: store/ imports none of ours
        base = base.where(PreferencePair.constitution == name)
        if version:
            base = base.where(col(PreferencePair.constitution_version).startswith(version, autoescape=True))
    if pair_ids is None:
        yield from session.exec(base.order_by(Review.pair_id, Review.created_at))
        return
    for chunk in _chunks(sorted(set(pair_ids))):
        yield from session.exec(base.where(col(Review.pair_id).in_(chunk)).order_by(Review.pair_id, Review.created_at))


def export_rows(session: Session, f: QueueFilter, limit: int | None = None, page: int = 500
                ) -> Iterator[tuple[PreferencePair, list[dict[str, Any]], dict[str, str]]]:
    """(pair, prompt messages, response id -> text) for the queue's pairs, a page at a time."""
    after, sent = None, 0
    while limit is None or sent < limit:
        pairs = queue_page(session, f, after, page if limit is None else min(page, limit - sent))
        if not pairs:
            return
        prompts = dict(session.exec(select(Prompt.id, Prompt.messages)
                                    .where(col(Prompt.id).in_({p.prompt_id for p in pairs}))).all())
        rids = {i for p in pairs for i in (p.chosen_id, p.rejected_id)}
        texts = dict(session.exec(select(Response.id, Response.text).where(col(Response.id).in_(rids))).all())
        for p in pairs:
            yield p, prompts.get(p.prompt_id, []), texts
        sent += len(pairs)
        after = pairs[-1].id


def chosen_ids(session: Session, pair_ids: Iterable[str]) -> dict[str, str]:
    """pair id -> chosen response id, for those of `pair_ids` the store has."""
    out: dict[str, str] = {}
    for chunk in _chunks(sorted(set(pair_ids))):
        out.update(session.exec(select(PreferencePair.id, PreferencePair.chosen_id)
                                .where(col(PreferencePair.id).in_(chunk))).all())
    return out


def current_verdicts(session: Session, pair_ids: Iterable[str]) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(pair id, reviewer) -> (their latest verdict, its note), skips included."""
    out: dict[tuple[str, str], tuple[str, str | None]] = {}
    for chunk in _chunks(sorted(set(pair_ids))):
        for pid, who, verdict, note in session.exec(
                select(Review.pair_id, Review.reviewer, Review.verdict, Review.note)
                .where(col(Review.pair_id).in_(chunk)).order_by(Review.created_at)):
            out[(pid, who)] = (verdict, note)
    return out


def prompt_texts(session: Session, pairs: list[PreferencePair]) -> dict[str, str]:
    """prompt id -> its text, for a page of pairs."""
    ids = list({p.prompt_id for p in pairs})
    return dict(session.exec(select(Prompt.id, Prompt.text).where(col(Prompt.id).in_(ids))).all()) if ids else {}


def review_counts(session: Session, pairs: list[PreferencePair]) -> dict[str, int]:
    """pair id -> verdicts stored (skips left out), for a page of pairs."""
    ids = [p.id for p in pairs]
    if not ids:
        return {}
    return dict(session.exec(select(Review.pair_id, func.count()).where(col(Review.pair_id).in_(ids),
                                                                         Review.verdict != "skip")
                             .group_by(Review.pair_id)).all())
