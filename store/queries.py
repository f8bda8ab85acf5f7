"""Queries that several stages share: which keys already exist, prompts by tag, prompt insertion."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlmodel import Session, select

from store.models import ConstitutionVersion, PreferencePair, Prompt, PromptTag
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


def tags_of(session: Session, prompt_ids: Iterable[str]) -> dict[str, list[str]]:
    """Every tag of each prompt (a principle may govern a prompt by any of them)."""
    ids = list(prompt_ids)
    out: dict[str, list[str]] = {i: [] for i in ids}
    for i in range(0, len(ids), CHUNK):
        for pid, tag in session.exec(select(PromptTag.prompt_id, PromptTag.tag)
                                     .where(PromptTag.prompt_id.in_(ids[i:i + CHUNK]))):
            out[pid].append(tag)
    return {k: sorted(v) for k, v in out.items()}


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


def version_hashes(session: Session, name: str, version: str) -> dict[str, str]:
    """Each principle's hash (preferences as "pref:<id>") in a stored constitution version."""
    row = session.exec(select(ConstitutionVersion).where(ConstitutionVersion.name == name,
                                                         ConstitutionVersion.version == version)).first()
    return dict(row.principle_hashes) if row else {}


def current_under(pair: PreferencePair, version: str, hashes: dict[str, str]) -> bool:
    """Does `pair` belong to `version` of its constitution? Yes if it was made under it, or if
    every principle it records (details.principle_hashes, or one of details.also_under: the
    principle versions that derived the very same pair again) has the same hash there: a pair
    whose texts did not change is the same pair under the new version, not minted again."""
    if pair.constitution_version == version:
        return True
    details = pair.details or {}
    for recorded in [details.get("principle_hashes") or {}] + list(details.get("also_under") or []):
        if recorded and all(hashes.get(k) == h for k, h in recorded.items()):
            return True
    return False


def note_rederived(session: Session, rows: Sequence[PreferencePair]) -> int:
    """Pairs a stage derived again under other principle versions (same id, so not inserted): add
    their principle hashes to the stored row's `also_under`, so the new version counts them as its
    own. Returns how many rows were updated; the caller commits."""
    wanted = {r.id: (r.details or {}).get("principle_hashes") for r in rows}
    wanted = {k: v for k, v in wanted.items() if v}
    updated = 0
    for stored in rows_by_id(session, PreferencePair, wanted).values():
        details = dict(stored.details or {})
        known = [details.get("principle_hashes") or {}] + list(details.get("also_under") or [])
        if wanted[stored.id] not in known:
            details["also_under"] = list(details.get("also_under") or []) + [wanted[stored.id]]
            stored.details = details
            session.add(stored)
            updated += 1
    return updated


def pairs_under(session: Session, name: str, version: str, *where: Any) -> list[PreferencePair]:
    """The pairs of constitution `name` that belong to `version` (current_under), by id."""
    hashes = version_hashes(session, name, version)
    rows = session.exec(select(PreferencePair).where(PreferencePair.constitution == name, *where)
                        .order_by(PreferencePair.id))
    return [p for p in rows if current_under(p, version, hashes)]
