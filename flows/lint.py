"""`cai constitution lint`: the inputs cai/lint.py checks a set of constitutions against.

    cai constitution lint                          # the bundled governing pair, the store's prompts
    cai constitution lint my-rules.yaml helpful-honest --prompts mine

The prompt categories and tags come from the store (every prompt, or those of `--prompts`);
with an empty or unreachable store, from the bundled prompt files, read without importing them.
Token counts use the bundled model's tokenizer (tokenizer.json alone, no model load).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from cai.lint import Finding, lint
from cai.prompts import BUNDLED, DATA_DIR, parse_file
from constitution.load import Constitution, ConstitutionError, find, load_file
from constitution.taxonomy import TaxonomyError, load_taxonomy
from flows.common import UserError


def _prompt_counts(url: str | None, tags: list[str] | None) -> tuple[dict[str, int], dict[str, int], str]:
    from sqlalchemy import func
    from sqlalchemy.engine import make_url
    from sqlmodel import select

    from store.db import DatabaseError, database_url, session_scope
    from store.models import Prompt, PromptTag

    full = database_url(url)
    if full.startswith("sqlite"):  # no store file yet: nothing stored to check, and lint makes none
        path = make_url(full).database
        if path and path != ":memory:" and not Path(path).exists():
            full = ""
    try:
        if not full:
            raise DatabaseError("no store")
        with session_scope(full) as s:
            q = select(PromptTag.tag, func.count()).group_by(PromptTag.tag)
            tag_counts = {t: n for t, n in s.exec(q) if not tags or t in tags}
            cq = select(Prompt.category, func.count()).group_by(Prompt.category)
            if tags:
                cq = cq.join(PromptTag, PromptTag.prompt_id == Prompt.id).where(PromptTag.tag.in_(tags))
            categories = {c or "(no category)": n for c, n in s.exec(cq)}
    except DatabaseError:
        tag_counts, categories = {}, {}
    if tag_counts:
        return categories, tag_counts, "the store"
    cats: Counter[str] = Counter()
    counts: dict[str, int] = {}
    for tag, name in BUNDLED.items():
        if tags and tag not in tags:
            continue
        parsed = parse_file(DATA_DIR / name).prompts
        counts[tag] = len(parsed)
        cats.update(p.category or "(no category)" for p in parsed)
    return dict(cats), counts, "the bundled prompt files"


def _token_counter():
    try:
        from tokenizers import Tokenizer

        from engines.bundled import gguf_tokenizer_dir

        tok = Tokenizer.from_file(str(gguf_tokenizer_dir() / "tokenizer.json"))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    except Exception:  # noqa: BLE001 - no tokenizer here: cai.lint's word estimate
        return None


def load_constitutions(refs: list[str]) -> list[Constitution]:
    out = []
    for ref in refs:
        try:
            out.append(load_file(find(ref)))
        except ConstitutionError as exc:
            raise UserError(str(exc)) from None
    return out


def run_lint(refs: list[str], prompts: list[str] | None = None, taxonomy: str | None = "harms",
             url: str | None = None) -> dict[str, Any]:
    """The findings for these constitutions (names or paths), and what they were checked against."""
    constitutions = load_constitutions(refs)
    categories, tags, source = _prompt_counts(url, prompts)
    kinds: dict[str, str] = {}
    if taxonomy:
        try:
            kinds = {c.id: c.kind for c in load_taxonomy(taxonomy).categories}
        except TaxonomyError as exc:
            raise UserError(str(exc)) from None
    findings: list[Finding] = lint(constitutions, categories=categories, tags=tags, taxonomy=kinds,
                                   count_tokens=_token_counter())
    return {"constitutions": [c.ref for c in constitutions], "prompts_from": source,
            "categories": categories, "findings": findings}


def stance_table(refs: list[str], url: str | None = None) -> list[dict[str, Any]]:
    """Per prompt tag and category: how many prompts, and what the constitutions declare for them
    (the principle that governs them and its stance; `ungoverned` when none does)."""
    from sqlmodel import select

    from constitution.govern import Governance
    from store.db import session_scope
    from store.models import Prompt, PromptTag
    from store.queries import tags_of

    gov = Governance(load_constitutions(refs))
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with session_scope(url) as s:
        prompts = list(s.exec(select(Prompt.id, Prompt.category)))
        tags = tags_of(s, [pid for pid, _ in prompts])
        tagged = list(s.exec(select(PromptTag.prompt_id, PromptTag.tag)))
    category = dict(prompts)
    for pid, tag in tagged:
        rule = gov.rule(category.get(pid), tags.get(pid, ()))
        key = (tag, category.get(pid) or "(no category)")
        entry = rows.setdefault(key, {"tag": key[0], "category": key[1], "prompts": 0,
                                      "stance": rule.stance if rule else "ungoverned",
                                      "principle": rule.ref if rule else "", "via": rule.via if rule else ""})
        entry["prompts"] += 1
    return [rows[k] for k in sorted(rows)]
