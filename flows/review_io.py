"""`cai review stats | export | import`: agreement figures, and people's verdicts as JSONL records in and out.

    cai review stats --json
    cai review export --out review.jsonl --method ai      # records in the shape of an Argilla record
    cai review import review.jsonl                        # verdicts given elsewhere, back into the store

The record shape and the figures are cai/review.py's; this module reads and writes the files.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from cai import review
from cai.errors import UserError
from cai.prompts import json_lines
from flows.configs import ReviewConfig
from store.db import session_scope
from store.models import PreferencePair, utcnow
from store.reviews import add_reviews, chosen_ids, current_verdicts, export_rows, verdict_rows


def stats(database_url: str | None = None, constitution: str | None = None) -> dict[str, Any]:
    with session_scope(database_url) as session:
        return review.compute(review.verdict_from_row(r) for r in verdict_rows(session, constitution=constitution))


def export_records(cfg: ReviewConfig, out: Path, limit: int | None = None) -> int:
    """The queue's pairs (cfg's filters, queue `all` unless set) as JSONL records; returns how many."""
    f = cfg.queue_filter()
    if "queue" not in cfg.model_fields_set:  # a file for another tool: every pair, reviewed or not
        f = replace(f, queue="all")
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    with session_scope(cfg.database_url) as session, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        batch: list[tuple[PreferencePair, list[dict[str, Any]], dict[str, str]]] = []

        def flush() -> None:
            ids = [p.id for p, _, _ in batch]
            per: dict[str, list[review.Verdict]] = {}
            for row in verdict_rows(session, pair_ids=ids):
                v = review.verdict_from_row(row)
                per.setdefault(v.pair_id, []).append(v)
            for p, messages, texts in batch:
                fh.write(json.dumps(review.to_record(p, messages, texts, per.get(p.id, [])), ensure_ascii=False) + "\n")
            batch.clear()

        for item in export_rows(session, f, limit):
            batch.append(item)
            n += 1
            if len(batch) >= 500:
                flush()
        flush()
    tmp.replace(out)
    return n


def import_records(path: Path, database_url: str | None = None) -> dict[str, int]:
    """People's verdicts from JSONL records (`cai review export`, or another tool's records of the same
    shape). Every line is checked before anything is written; a verdict that is already the reviewer's
    current one on that pair is skipped, so importing a file twice adds nothing."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records = json_lines(path)
    source = f"import:{path.name}"
    with session_scope(database_url) as session:
        known = chosen_ids(session, [r.get("id") for _, r in records if isinstance(r, dict)
                                     and isinstance(r.get("id"), str)])
        verdicts: list[review.Imported] = []
        for n, rec in records:
            try:
                verdicts += review.from_record(rec, known)
            except ValueError as exc:
                raise UserError(f"{path}:{n}: {exc}; nothing was imported") from None
        current = current_verdicts(session, [v.pair_id for v in verdicts])
        now = utcnow()
        rows, same = [], 0
        for v in verdicts:
            if current.get((v.pair_id, v.reviewer)) == (v.verdict, v.note):
                same += 1
                continue
            current[(v.pair_id, v.reviewer)] = (v.verdict, v.note)
            rows.append(review.review_row(v.pair_id, v.reviewer, v.verdict, v.left, v.note, now, source))
        added = add_reviews(session, rows)
    return {"records": len(records), "verdicts": len(verdicts), "added": added, "already_known": same}
