"""One preference per pair of responses: the latest label wins.

The same two responses can be labelled more than once: relabelling with other judge settings
or another judge adds a pair row (the old one stays, for the record), and after a constitution
edit the revision pair of a prompt whose responses did not change is stored again under the new
version. Training and export must count such a pair once, or it weighs double.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from store.models import PreferencePair

P = TypeVar("P", bound=PreferencePair)


def latest_per_response_pair(pairs: Iterable[P]) -> tuple[list[P], int]:
    """(kept pairs in their input order, how many older duplicates were dropped).

    Two rows are the same pair when they have the same method and the same two responses in
    either order; the one created last is kept (ties: the larger id, so the choice is stable)."""
    pairs = list(pairs)
    best: dict[tuple, P] = {}
    for p in pairs:
        key = (p.method, frozenset((p.chosen_id, p.rejected_id)))
        cur = best.get(key)
        if cur is None or (p.created_at, p.id) > (cur.created_at, cur.id):
            best[key] = p
    keep = {p.id for p in best.values()}
    kept = [p for p in pairs if p.id in keep]
    return kept, len(pairs) - len(kept)
