"""Preference pairs for training: from the store, or from records in TRL's conversational format.

    with session_scope() as s:
        pairs = select_pairs(s, PairFilter(constitution="harmless", methods=("revision", "ai")))
    pairs = examples_from_records(load_from_disk("out/harmless")["train_prefs"])
    train, held_out = split_eval(pairs, 0.1)

Also the reference log-prob cache (store.RefLogp): keyed by what determines the number (model,
truncation settings, prompt messages, response text), so a second run on the same pairs, or
a run on a superset, reads instead of recomputing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from store.db import session_scope
from store.keys import content_hash, prompt_id
from store.models import ConstitutionVersion, PreferencePair, Prompt, RefLogp, Response
from store.pairs import latest_per_response_pair
from store.queries import pairs_under
from store.split import held_out_prompts
from store.upsert import insert_ignore

Message = dict[str, str]


@dataclass(frozen=True)
class PairExample:
    """One training pair: prompt messages (ending with the user turn), two answers, the label."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    label_prob: float = 1.0  # P(chosen better); 1.0 for revision pairs and hard labels
    id: str = ""  # PreferencePair.id, or a content hash for records without one
    method: str = ""  # revision | ai | "" when unknown
    # False: the generator's token limit stopped that reply (finish_reason "length"), so training
    # appends no end-of-turn after it; a model taught to stop where the cap cut learns short answers
    chosen_ended: bool = True
    rejected_ended: bool = True
    stored_prompt_id: str = ""  # Prompt.id from the store or an export's prompt_id column; "" when unknown

    @property
    def prompt_key(self) -> str:
        return content_hash("prompt", list(self.prompt))

    @property
    def prompt_id(self) -> str:
        """The store's id for this prompt (computed from the messages as the store does when unknown):
        what the held-out split hashes, so `cai train` holds out the prompts `cai export` puts in test."""
        return self.stored_prompt_id or prompt_id(list(self.prompt))


def _completion_text(value: Any, where: str) -> str:
    """A TRL completion: a string, or [{"role": "assistant", "content": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], Mapping) and "content" in value[-1]:
        if value[-1].get("role", "assistant") != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's, "
                             f"got role {value[-1].get('role')!r}")
        return str(value[-1]["content"])
    raise ValueError(f"{where}: expected a string or a list of messages ending with the assistant's answer")


ROLES = ("system", "user", "assistant")  # what a chat template renders


def prompt_messages(value: Any, where: str) -> tuple[Message, ...]:
    """A prompt as chat messages: text (one user turn) or {role, content} messages ending with a
    user turn; ValueError naming `where` otherwise."""
    return _messages(value, where)


def label_prob(record: Mapping[str, Any], where: str) -> float | None:
    """A record's label_prob as a number in [0, 1]; None when absent or null."""
    p = record.get("label_prob")
    if p is None:
        return None
    try:
        value = float(p) if not isinstance(p, bool) else None
    except (TypeError, ValueError, OverflowError):  # a list, "high", an int of 400 digits
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: label_prob must be a number in [0, 1], got {p!r}")
    return value


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if isinstance(value, str):  # a plain-text prompt is one user turn
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{j}]: expected a {{role, content}} message")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"{where}[{j}]: expected role {', '.join(ROLES)} and text content, "
                             f"got role {m['role']!r} and {type(m['content']).__name__} content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt must end with a user turn, not the assistant's")
    return tuple(out)


def _ended(r: Mapping[str, Any], key: str, where: str) -> bool:
    """Not `key` (`chosen_cut` / `rejected_cut`, as `cai export` writes them): a reply the token cap
    cut is trained without an end-of-turn, as from the store. Absent or null (a version-1 export,
    a hand-made file): not cut."""
    cut = r.get(key)
    if cut is None:
        return True
    if not isinstance(cut, bool):
        raise ValueError(f"{where}: {key} must be true, false or null, got {cut!r}")
    return not cut


def examples_from_records(records: Iterable[Mapping[str, Any]],
                          where: Sequence[str] | None = None) -> list[PairExample]:
    """Pairs from dicts with prompt / chosen / rejected (+ optional label_prob, id, method,
    chosen_cut, rejected_cut).

    Accepts what `cai export` writes (TRL's conversational preference format), so a HF
    `Dataset` of the prefs split can be passed as it is. Errors name the row and the field.
    """
    out = []
    for i, r in enumerate(records):
        at = where[i] if where is not None else f"record {i}"  # `where`: each record's name, e.g. file:line
        if not isinstance(r, Mapping):
            raise ValueError(f"{at}: expected an object with prompt, chosen, rejected, got {type(r).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in r:
                raise ValueError(f"{at}: missing field {key!r} (expected prompt, chosen, rejected)")
        prompt = _messages(r["prompt"], f"{at}: prompt")
        chosen = _completion_text(r["chosen"], f"{at}: chosen")
        rejected = _completion_text(r["rejected"], f"{at}: rejected")
        p = label_prob(r, at)
        p = 1.0 if p is None else p
        pid = r.get("id") or r.get("pair_id") or content_hash("pair", list(prompt), chosen, rejected)
        out.append(PairExample(prompt, chosen, rejected, p, str(pid), str(r.get("method") or ""),
                               _ended(r, "chosen_cut", at), _ended(r, "rejected_cut", at),
                               str(r.get("prompt_id") or "")))
    return out


@dataclass(frozen=True)
class PairFilter:
    """Which stored pairs to train on."""

    constitution: str | None = None  # name or name@version (a prefix is enough), or several, comma-separated
    methods: tuple[str, ...] = ("revision", "ai")
    statuses: tuple[str, ...] = ("ok",)  # ties and position-inconsistent labels teach nothing reliable
    min_label_prob: float | None = None

    def describe(self) -> str:
        # parentheses, not brackets: the CLI prints errors through rich, which eats [markup]
        parts = [f"constitution={self.constitution or 'any'}", f"method in ({', '.join(self.methods)})",
                 f"status in ({', '.join(self.statuses)})"]
        if self.min_label_prob is not None:
            parts.append(f"label_prob >= {self.min_label_prob}")
        return ", ".join(parts)


def select_pairs(session: Session, filt: PairFilter) -> list[PairExample]:
    """Stored pairs joined to their prompt messages and answer texts, in a stable (id) order.

    The same two responses labelled twice (a relabel, or a revision pair stored again under a
    new constitution version) count once: the latest row, and its status decides."""
    chosen, rejected = aliased(Response), aliased(Response)
    q = (select(PreferencePair, Prompt.messages, chosen.text, rejected.text, chosen.finish_reason,
                rejected.finish_reason)
         .join(Prompt, Prompt.id == PreferencePair.prompt_id)
         .join(chosen, chosen.id == PreferencePair.chosen_id)
         .join(rejected, rejected.id == PreferencePair.rejected_id)
         .where(PreferencePair.method.in_(list(filt.methods)))
         .order_by(PreferencePair.id))
    allowed: set[str] | None = None  # None: no constitution filter
    whole: set[str] = set()  # names given without a version: every pair of theirs
    if filt.constitution:
        # constitution.load.split_refs, written out: training/ imports store/ only (DESIGN.md), and the filter
        # keeps the text as given because describe() and a run's stored `filters` show it
        refs = [r.strip().partition("@") for r in filt.constitution.split(",") if r.strip()]
        q = q.where(PreferencePair.constitution.in_(sorted({name for name, _, _ in refs})))
        allowed = _ids_under(session, [(name, version) for name, _, version in refs])
        whole = {name for name, _, version in refs if not version}
    rows = {row[0].id: row for row in session.exec(q).all()
            if allowed is None or row[0].id in allowed or row[0].constitution in whole}
    latest, _ = latest_per_response_pair(row[0] for row in rows.values())
    out = []
    for pair in latest:
        if pair.status not in filt.statuses:
            continue
        if filt.min_label_prob is not None and pair.label_prob < filt.min_label_prob:
            continue
        _, messages, chosen_text, rejected_text, chosen_finish, rejected_finish = rows[pair.id]
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        out.append(PairExample(prompt, chosen_text, rejected_text, float(pair.label_prob), pair.id,
                               pair.method, chosen_finish != "length", rejected_finish != "length", pair.prompt_id))
    return out


def _ids_under(session: Session, refs: Sequence[tuple[str, str]]) -> set[str]:
    """Ids of the pairs that belong to each NAME@VERSION (store.queries.current_under: made under
    it, or made earlier from principles that version leaves unchanged). A version prefix the store
    never recorded matches the pairs stamped with it."""
    ids: set[str] = set()
    for name, prefix in refs:
        if not prefix:
            continue
        versions = [v for v in session.exec(select(ConstitutionVersion.version)
                                            .where(ConstitutionVersion.name == name)) if v.startswith(prefix)]
        if not versions:
            ids |= set(session.exec(select(PreferencePair.id).where(
                PreferencePair.constitution == name,
                PreferencePair.constitution_version.startswith(prefix, autoescape=True))))
        for version in versions:
            ids |= {p.id for p in pairs_under(session, name, version)}
    return ids


def constitution_versions(session: Session, pair_ids: Sequence[str]) -> list[str]:
    """The distinct name@version of the given pairs (a training run records what it learned from)."""
    refs: set[str] = set()
    ids = list(pair_ids)
    for i in range(0, len(ids), 500):
        rows = session.exec(select(PreferencePair.constitution, PreferencePair.constitution_version)
                            .where(PreferencePair.id.in_(ids[i:i + 500]))).all()
        refs.update(f"{n}@{v}" for n, v in rows)
    return sorted(refs)


def cap_method(pairs: Sequence[PairExample], method: str, ratio: float | None,
               prefer: Collection[str] = ()) -> list[PairExample]:
    """`pairs` with at most `ratio` pairs of `method` per pair of any other method: those whose
    prompt is in `prefer` (prompt keys) first, then the first by pair id (stable across runs);
    the others all kept, the order otherwise unchanged."""
    if ratio is None:
        return list(pairs)
    others = sum(p.method != method for p in pairs)
    ranked = sorted((p for p in pairs if p.method == method), key=lambda p: (p.prompt_key not in prefer, p.id))
    keep = {p.id for p in ranked[:math.floor(ratio * others)]}
    return [p for p in pairs if p.method != method or p.id in keep]


def repeat_prompts(pairs: Sequence[PairExample], keys: Collection[str], times: int) -> list[PairExample]:
    """`pairs` with every pair whose prompt is in `keys` present `times` times (each copy right
    after the original): more weight on the prompts the model gets wrong, no new data."""
    out: list[PairExample] = []
    for p in pairs:
        out.extend([p] * (times if p.prompt_key in keys else 1))
    return out


def split_eval(examples: Sequence[PairExample], fraction: float
               ) -> tuple[list[PairExample], list[PairExample]]:
    """Held-out pairs: those of the prompts store/split.py holds out (the rule `cai export` uses for
    its test splits), so eval never sees a prompt trained on. A set of two or more prompts always
    gets a held-out prompt, and never loses all its training prompts."""
    ids = [e.prompt_id for e in examples]  # a record without one hashes its messages: once, not three times
    held = held_out_prompts(ids, fraction, min_prompts=2, at_least_one=True)
    return ([e for e, p in zip(examples, ids, strict=True) if p not in held],
            [e for e, p in zip(examples, ids, strict=True) if p in held])


def selection_hash(examples: Sequence[PairExample]) -> str:
    """Identifies the exact set of pairs a run trained on."""
    return content_hash("pairs", sorted(e.id for e in examples))


# --- reference log-prob cache ---------------------------------------------------------------

@dataclass(frozen=True)
class RefValue:
    logp: float
    n_tokens: int
    truncated: bool = False


def ref_key(ref_model: str, settings: Mapping[str, Any], prompt: Sequence[Message], response: str,
            ended: bool = True) -> str:
    """`ended=False` (no end-of-turn scored) is another sequence; an ended one keeps its old key."""
    return content_hash("ref-logp", ref_model, dict(settings), list(prompt), response, *(() if ended else ("cut",)))


class RefCache(Protocol):
    def get(self, keys: Sequence[str]) -> dict[str, RefValue]: ...

    def put(self, ref_model: str, values: Mapping[str, RefValue]) -> None: ...


class StoreRefCache:
    """Reference log-probs in store.RefLogp (shared by every run and worker on this database)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    def get(self, keys: Sequence[str]) -> dict[str, RefValue]:
        out: dict[str, RefValue] = {}
        keys = list(dict.fromkeys(keys))
        with session_scope(self.url) as s:
            for i in range(0, len(keys), 500):
                rows = s.exec(select(RefLogp).where(RefLogp.id.in_(keys[i:i + 500]))).all()
                out.update({r.id: RefValue(r.logp, r.n_tokens, r.truncated) for r in rows})
        return out

    def put(self, ref_model: str, values: Mapping[str, RefValue]) -> None:
        rows = [RefLogp(id=k, ref_model=ref_model, logp=v.logp, n_tokens=v.n_tokens, truncated=v.truncated)
                for k, v in values.items()]
        with session_scope(self.url) as s:
            insert_ignore(s, RefLogp, rows)


@dataclass
class MemoryRefCache:
    """The same interface in a dict: benchmarks and tests without a database."""

    values: dict[str, RefValue] = field(default_factory=dict)

    def get(self, keys: Sequence[str]) -> dict[str, RefValue]:
        return {k: self.values[k] for k in keys if k in self.values}

    def put(self, ref_model: str, values: Mapping[str, RefValue]) -> None:
        self.values.update(values)
