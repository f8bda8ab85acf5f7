"""The store reads of `cai export` (flows/export.py); the rules that use them are in cai/export_rows.py.

    pair_dates(session, "harmless")                      # version -> its newest pair's created_at
    column_by_ids(session, Response.text, ids, Response.finish_reason)

Every read by many ids goes a chunk at a time, in sorted id order, under SQLite's bound-parameter
limit, and reads only the columns it needs (a response's conversation is far larger than its text).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from store.db import mask_secrets
from store.models import ConstitutionVersion, Failure, PreferencePair, PromptTag, Response, Run
from store.queries import CHUNK


def chunks(ids: Iterable[str]) -> Iterator[list[str]]:
    """The distinct ids, sorted, CHUNK at a time."""
    items = sorted(set(ids))
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def pair_dates(session: Session, name: str) -> dict[str, datetime]:
    """Each version of constitution `name` that has pairs -> when its newest pair was made."""
    last: dict[str, datetime] = {}
    for version, created in session.exec(select(PreferencePair.constitution_version, PreferencePair.created_at)
                                         .where(PreferencePair.constitution == name)).all():
        last[version] = max(last.get(version, created), created)
    return last


def constitutions_with_pairs(session: Session) -> list[str]:
    return sorted(set(session.exec(select(PreferencePair.constitution).distinct())))


def version_dates(session: Session, name: str) -> dict[str, datetime]:
    """Each version of `name` the store recorded -> when the store first saw it."""
    return {r.version: r.created_at for r in session.exec(
        select(ConstitutionVersion).where(ConstitutionVersion.name == name))}


def constitution_version(session: Session, name: str, version: str) -> ConstitutionVersion | None:
    return session.exec(select(ConstitutionVersion).where(
        ConstitutionVersion.name == name, ConstitutionVersion.version == version)).first()


def tagged_prompts(session: Session, tags: list[str]) -> set[str]:
    """Ids of the prompts carrying any of `tags`."""
    return set(session.exec(select(PromptTag.prompt_id).where(col(PromptTag.tag).in_(tags))))


def quarantined_keys(session: Session) -> set[str]:
    """The item keys (pair or response ids among them) of quarantined failures."""
    return set(session.exec(select(Failure.item_key).where(Failure.quarantined == True)))  # noqa: E712


def column_by_ids(session: Session, column: Any, ids: Iterable[str], *also: Any) -> dict[str, Any]:
    """id -> one column of the rows with these ids (never the whole row). With `also` (more columns
    of the same table, read in the same query): id -> (column, *also)."""
    key = column.class_.id
    out: dict[str, Any] = {}
    for chunk in chunks(ids):
        rows = session.exec(select(key, column, *also).where(col(key).in_(chunk))).all()
        out.update((r[0], tuple(r[1:]) if also else r[1]) for r in rows)
    return out


def response_facts(session: Session, ids: Iterable[str]) -> tuple[Counter, Counter, set[str]]:
    """(sampling settings as sorted JSON, models, run ids) of these responses, counted."""
    sampling: Counter = Counter()
    models: Counter = Counter()
    run_ids: set[str] = set()
    for chunk in chunks(ids):
        for sampled, model, run_id in session.exec(select(Response.sampling, Response.model, Response.run_id)
                                                   .where(col(Response.id).in_(chunk))):
            sampling[json.dumps(sampled, sort_keys=True)] += 1
            models[model] += 1
            run_ids.add(run_id)
    return sampling, models, run_ids


def finished_by(session: Session, ids: Iterable[str], finish_reason: str) -> set[str]:
    """The ids among these whose reply stopped for `finish_reason` (only those are held)."""
    out: set[str] = set()
    for chunk in chunks(ids):
        out.update(session.exec(select(Response.id).where(
            col(Response.id).in_(chunk), Response.finish_reason == finish_reason)))
    return out


def tag_counts(session: Session, prompt_ids: Iterable[str]) -> Counter:
    """How many of these prompts carry each tag."""
    return Counter(t for chunk in chunks(prompt_ids)
                   for t in session.exec(select(PromptTag.tag).where(col(PromptTag.prompt_id).in_(chunk))))


def run_facts(session: Session, ids: Iterable[str]) -> list[dict[str, Any]]:
    """The runs with these ids, by id, as the card lists them (their configs' secrets masked: rows
    stored before masking hold passwords)."""
    runs = [r for chunk in chunks(ids) for r in session.exec(select(Run).where(col(Run.id).in_(chunk)))]
    return [{"id": r.id, "flow": r.flow, "model": r.model, "engine": r.engine,
             "engine_facts": (r.summary or {}).get("engine") or {},
             "constitution_version": r.constitution_version, "config": mask_secrets(r.config)}
            for r in sorted(runs, key=lambda r: r.id)]
