"""Content keys: every expensive row is keyed by a hash of exactly what produced it; and the one way
the store's datetimes are compared."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace variation, unicode kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(*parts: Any, length: int = 32) -> str:
    """Hex SHA-256 of the canonical JSON of `parts`, cut to `length` characters."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:length]


class RowsHash:
    """content_hash(*head, rows) computed as rows arrive: the same digest, without the list."""

    def __init__(self, *head: Any) -> None:
        self._h = hashlib.sha256(canonical_json(list(head))[:-1].encode("utf-8") + b",[")
        self._first = True

    def add_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._h.update((b"" if self._first else b",") + canonical_json(row).encode("utf-8"))
            self._first = False

    def hexdigest(self, length: int) -> str:
        h = self._h.copy()
        h.update(b"]]")
        return h.hexdigest()[:length]


def prompt_id(messages: list[dict[str, str]]) -> str:
    """A prompt's id in the store: a hash of its messages' roles and contents."""
    return content_hash([{"role": m["role"], "content": m["content"]} for m in messages], length=24)


def naive_utc(dt: datetime) -> datetime:
    """Drivers hand datetimes back naive (meaning UTC) or aware: compare them all as naive UTC."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt
