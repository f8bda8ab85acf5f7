"""Queries that several stages share: which keys already exist, prompts by tag, prompt insertion."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlmodel import Session, select

from store.models import PreferencePair, Prompt, PromptTag
from store.upsert import insert_ignore

CHUNK = 500  # ids per IN (...) clause: well under every driver's parameter limit


def existing_ids(session: Session, column: Any, keys: Sequence[str], *where: Any) -> set[str]:
    """The subset of `keys` present in `column` (optionally also matching `where`)."""
    found: set[str] = set()
    keys = list(keys)
    for i in range(0, len(keys), CHUNK):
        found |= set(session.exec(select(column).where(column.in_(keys[i:i + CHUNK]), *where)))
    return found


def rows_by_id(session: Session, model: Any, ids: Iterable[str]) -> dict[str, Any]:
    ids = list(ids)
    out: dict[str, Any] = {}
    for i in range(0, len(ids), CHUNK):
        for row in session.exec(select(model).where(model.id.in_(ids[i:i + CHUNK]))):
            out[row.id] = row
    return out


def prompts_for_tags(session: Session, tags: list[str]) -> list[Prompt]:
    """Prompts carrying any of `tags`, sorted by id (a stable order for batching and seeds)."""
    stmt = select(Prompt).join(PromptTag, PromptTag.prompt_id == Prompt.id).where(PromptTag.tag.in_(tags))
    seen: dict[str, Prompt] = {}
    for p in session.exec(stmt):
        seen.setdefault(p.id, p)
    return [seen[k] for k in sorted(seen)]


def has_tag(session: Session, tag: str) -> bool:
    return session.exec(select(PromptTag).where(PromptTag.tag == tag).limit(1)).first() is not None


def known_tags(session: Session) -> set[str]:
    return set(session.exec(select(PromptTag.tag).distinct()))


def store_prompts(session: Session, parsed: Sequence[Any], source: str, tags: list[str]) -> tuple[int, int]:
    """Insert parsed prompts (with `.id`, `.messages`, `.category`) and their tags.

    Returns (new prompts, already present). The caller commits.
    """
    unique: dict[str, Any] = {}
    for p in parsed:
        unique.setdefault(p.id, p)
    rows = [Prompt(id=pid, text=p.messages[-1]["content"], messages=p.messages, category=p.category,
                   source=source) for pid, p in unique.items()]
    new = insert_ignore(session, Prompt, rows)
    insert_ignore(session, PromptTag, [PromptTag(prompt_id=pid, tag=t) for pid in unique for t in tags])
    return new, len(unique) - new


def ai_pairs(session: Session, name: str | None = None, version: str | None = None,
             judge_model: str | None = None) -> list[PreferencePair]:
    """AI-labelled pairs, optionally of one constitution name / version prefix and one judge."""
    stmt = select(PreferencePair).where(PreferencePair.method == "ai")
    if name:
        stmt = stmt.where(PreferencePair.constitution == name)
    if version:
        stmt = stmt.where(PreferencePair.constitution_version.startswith(version))
    if judge_model:
        stmt = stmt.where(PreferencePair.judge_model == judge_model)
    return list(session.exec(stmt))
