"""The store reads and writes of `cai eval` (flows/evaluate.py) beyond the shared ones in store/queries.py.

    results_of(session, "fake-dpo-vs-fake-base@b5c45904")   # every EvalResult row of that eval
    answered(session, keys), judged(session, keys)           # which of these rows exist / are judged
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, select

from store.models import EvalResult
from store.queries import existing_ids


def results_of(session: Session, name: str) -> list[EvalResult]:
    """The rows of the eval called `name` (cai/evaluate.py: eval_name)."""
    return list(session.exec(select(EvalResult).where(EvalResult.eval_name == name)))


def answered(session: Session, keys: Sequence[str]) -> set[str]:
    return existing_ids(session, EvalResult.id, keys)


def judged(session: Session, keys: Sequence[str]) -> set[str]:
    """The rows among `keys` that carry the judge's verdict (a win probability)."""
    return existing_ids(session, EvalResult.id, keys, EvalResult.win_prob.is_not(None))


def set_drift(session: Session, ids: Sequence[str], values: Sequence[float | None]) -> None:
    """Store each reply's drift (its mean per-token log-prob under the baseline) in its details."""
    for key, value in zip(ids, values, strict=True):
        row = session.get(EvalResult, key)
        row.details = {**row.details, "drift": value}
        session.add(row)
