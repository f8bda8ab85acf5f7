"""Export preference pairs and revisions as a Hugging Face DatasetDict with a dataset card.

    cai export --constitution harmless --out exports/harmless
    cai export --constitution harmless@3f2a9c1b --method ai --min-margin 0.2 --format parquet --out exports/h
    HF_TOKEN=hf_... cai export --constitution harmless --out exports/h --push-to-hub me/harmless-cai --private

Which rows (`select_pairs`):
- `--constitution NAME` takes the newest version of NAME that has preference pairs (newest by
  when the store first saw the version); `NAME@VERSION` pins one version (a unique prefix works).
  One export is always one constitution version, so its card can show that version's text.
- `--method`, `--tag` (prompts with any of the tags), `--min-label-prob`, `--min-margin`
  (|p - 0.5|), `--since` (inclusive) / `--until` (exclusive) on the pair's created_at, in UTC.
- Ties, position-inconsistent pairs and pairs touching a quarantined item (the pair id or its
  chosen/rejected response id is a quarantined `failure.item_key`) are left out unless a flag
  includes them; the `status` column tells them apart.

What comes out (`build_export`): splits train_sft/test_sft (revision pairs: prompt + final revision)
and train_prefs/test_prefs (all selected pairs), typed by cai/dataset_schema.py, rows sorted by
id; an empty split is left out (no client can load one). A prompt's split is a hash of its id, so
it never changes as data is added and a prompt never sits in both halves (a small export whose
hash put no prompt in test moves the lowest buckets there; the card says so). A reply the token
cap stopped (finish_reason "length") is marked in its row's `*_cut` column and counted on the card,
which tells trainers not to put an end-of-turn after it. The same store and
options give byte-identical files; flows/publish.py writes them (and pushes), cai/card.py
renders the card and manifest.

Memory: the selected pairs' rows (ids, labels, provenance) are held; their prompts and texts are
read PAGE pairs at a time (`iter_rows`, reading only the columns a row needs) and written to arrow
files beside --out as they come (`to_dataset_dict`), memory-mapped from there for writing.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from cai import dataset_schema as schema
from cai import review
from cai.card import label_prob_stats
from constitution.load import split_ref
from flows.common import Timer, UserError, run_logger
from flows.configs import ExportConfig
from flows.configs import make_export_config as make_config  # noqa: F401 - `cai export` and tests call it here
from flows.configs import naive_utc as _naive_utc
from flows.orchestration import stage_flow, stage_task
from flows.publish import check_out, hub_token, push_export, write_export
from store.db import checkpoint_wal, session_scope
from store.keys import canonical_json
from store.models import ConstitutionVersion, Failure, PreferencePair, Prompt, PromptTag, Response, Run
from store.pairs import latest_per_response_pair
from store.queries import pairs_under
from store.reviews import verdict_rows
from store.runs import recorded_run

SFT_METHODS = ("revision", "contrastive", "helpful")  # their chosen side is a reply to learn; an AI label is not
SPLIT_SALT = "cai-factory/split/v1"  # changing it reshuffles every prompt: never do it silently
MIN_PROMPTS_FOR_TEST = 10  # with fewer, an empty test split is honest: one prompt is no test set
PAGE = 1000  # pairs whose prompts and texts are read per query while rows are written (iter_rows)


def parse_when(value: str | None, option: str) -> datetime | None:
    """`2024-05-01` or `2024-05-01T12:00[:00][+02:00]`; naive means UTC."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option}: expected a date like 2024-05-01 or 2024-05-01T12:00, "
                        f"got {value!r}") from None


def command_line(config: ExportConfig) -> str:
    """The command that selects these rows; destinations (--out, --push-to-hub) are left out so
    the card does not change with where it was written."""
    parts = ["cai", "export", "--constitution", config.constitution]
    parts += [a for m in config.methods for a in ("--method", m)]
    parts += [a for t in config.tags for a in ("--tag", t)]
    for opt, val in (("--min-label-prob", config.min_label_prob), ("--min-margin", config.min_margin)):
        if val is not None:
            parts += [opt, repr(val)]
    for opt, when in (("--since", config.since), ("--until", config.until)):
        if when is not None:
            parts += [opt, when.isoformat()]
    for opt, on in (("--include-ties", config.include_ties),
                    ("--include-inconsistent", config.include_inconsistent),
                    ("--include-quarantined", config.include_quarantined)):
        if on:
            parts.append(opt)
    if config.reviewed != "any":
        parts += ["--reviewed", config.reviewed]
    if config.people_order:
        parts.append("--people-order")
    if config.test_fraction != ExportConfig.model_fields["test_fraction"].default:
        parts += ["--test-fraction", repr(config.test_fraction)]
    if config.license != ExportConfig.model_fields["license"].default:
        parts += ["--license", config.license]
    parts += ["--format", config.format]
    return shlex.join(parts)


# --- selection -----------------------------------------------------------------------------

@dataclass
class Selection:
    """The selected pairs' rows (ids, labels, provenance: no texts). Texts are read a page at a time
    while the data files are written (`iter_rows`), so an export never holds the store's texts."""

    name: str
    version: str
    pairs: list[PreferencePair]  # sorted by id
    available: int  # pairs of this version before any filter
    removed: dict[str, int] = field(default_factory=dict)  # filter -> pairs it removed
    review: dict[str, Any] = field(default_factory=dict)  # people's verdicts on the pairs (cai/review.py)


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _by_ids(session: Session, model: Any, ids: Iterable[str]) -> dict[str, Any]:
    """Rows by primary key, in chunks that stay under SQLite's bound-parameter limit."""
    out: dict[str, Any] = {}
    for chunk in _chunks(sorted(set(ids))):
        out.update({r.id: r for r in session.exec(select(model).where(col(model.id).in_(chunk)))})
    return out


def resolve_version(session: Session, ref: str) -> tuple[str, str]:
    """(name, version) for NAME (newest version that has pairs) or NAME@VERSION (prefix ok)."""
    name, wanted = split_ref(ref.strip())
    rows = session.exec(select(PreferencePair.constitution_version, PreferencePair.created_at)
                        .where(PreferencePair.constitution == name)).all()
    last_pair: dict[str, datetime] = {}
    for version, created in rows:
        last_pair[version] = max(last_pair.get(version, created), created)
    if not last_pair:
        names = sorted(set(session.exec(select(PreferencePair.constitution).distinct())))
        raise UserError(f"constitution {ref}: the store has no preference pairs for {name!r} "
                        f"(constitutions with pairs: {', '.join(names) or 'none'}); "
                        "run `cai generate` / `cai label` first")
    if wanted:
        match = sorted(v for v in last_pair if v.startswith(wanted))
        if len(match) != 1:
            problem = "no pairs for that version" if not match else "ambiguous version prefix"
            raise UserError(f"constitution {ref}: {problem} (versions of {name!r} with pairs: "
                            f"{', '.join(sorted(last_pair))})")
        return name, match[0]
    seen = {r.version: r.created_at for r in session.exec(
        select(ConstitutionVersion).where(ConstitutionVersion.name == name))}
    # a version the store never recorded (should not happen) is dated by its newest pair
    newest = max(last_pair, key=lambda v: (_naive_utc(seen.get(v, last_pair[v])), v))
    return name, newest


def _tagged(session: Session, tags: list[str]) -> set[str]:
    return set(session.exec(select(PromptTag.prompt_id).where(col(PromptTag.tag).in_(tags))))


def _quarantined(session: Session) -> set[str]:
    return set(session.exec(select(Failure.item_key).where(Failure.quarantined == True)))  # noqa: E712


def select_pairs(session: Session, config: ExportConfig) -> Selection:
    """The pairs the config selects (their rows; the texts are read later, a page at a time)."""
    name, version = resolve_version(session, config.constitution)
    # the pairs made under this version, and those made earlier from principles it leaves unchanged
    pairs = pairs_under(session, name, version)
    sel = Selection(name, version, [], available=len(pairs))
    # before the status filters: a relabelled pair is judged by its latest label, not its best one
    pairs, superseded = latest_per_response_pair(pairs)
    if superseded:
        sel.removed["superseded (an older label of the same two responses)"] = superseded
    since = _naive_utc(config.since) if config.since else None
    until = _naive_utc(config.until) if config.until else None
    statuses = {"ok"} | ({"tie"} if config.include_ties else set()) | (
        {"position-inconsistent"} if config.include_inconsistent else set())
    tagged = _tagged(session, config.tags) if config.tags else set()
    bad = set() if config.include_quarantined else _quarantined(session)
    # every status left out is counted on its own: the card says what each quality gate removed
    for status in sorted({p.status for p in pairs} - statuses):
        sel.removed[f"status {status}"] = sum(p.status == status for p in pairs)
    pairs = [p for p in pairs if p.status in statuses]
    filters: list[tuple[str, Any]] = [
        (f"method {','.join(config.methods)}",
         (lambda p: p.method in config.methods) if config.methods else None),
        (f"min-label-prob {config.min_label_prob}",
         (lambda p: p.label_prob >= config.min_label_prob) if config.min_label_prob is not None else None),
        (f"min-margin {config.min_margin}",
         (lambda p: abs(p.label_prob - 0.5) >= config.min_margin) if config.min_margin is not None else None),
        (f"since {config.since}", (lambda p: _naive_utc(p.created_at) >= since) if since else None),
        (f"until {config.until}", (lambda p: _naive_utc(p.created_at) < until) if until else None),
        (f"tag {','.join(config.tags)}", (lambda p: p.prompt_id in tagged) if config.tags else None),
        ("quarantined", (lambda p: not ({p.id, p.chosen_id, p.rejected_id} & bad)) if bad else None),
    ]
    for label, keep in filters:
        if keep is None:
            continue
        kept = [p for p in pairs if keep(p)]
        if len(kept) < len(pairs):
            sel.removed[label] = len(pairs) - len(kept)
        pairs = kept
    pairs, sel.review = apply_reviews(session, pairs, config.reviewed, config.people_order)
    if sel.review["mode"] != "any":
        for verdict, n in sorted(sel.review["dropped"].items()):
            sel.removed[f"reviewed {config.reviewed} ({verdict})"] = n
    if not pairs:
        why = "; ".join(f"{k} removed {n}" for k, n in sel.removed.items()) or "no filter removed any"
        raise UserError(f"nothing to export for {name}@{version}: {sel.available} pairs stored, none left "
                        f"after the filters ({why}); loosen --method/--tag/--min-label-prob/--min-margin/"
                        "--since/--until/--reviewed or add --include-ties/--include-inconsistent/--include-quarantined")
    sel.pairs = pairs
    return sel


def apply_reviews(session: Session, pairs: list[PreferencePair], mode: str, people_order: bool
                  ) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The pairs `--reviewed MODE` keeps (a pair people flipped as a detached copy in their order when
    `people_order`), and the people's figures for the card (cai/review.py)."""
    ids = [p.id for p in pairs]
    verdicts = [review.verdict_from_row(row) for row in verdict_rows(session, pair_ids=ids)]
    decision = review.decide(ids, verdicts, mode, people_order)
    kept = [p if p.id in decision.keep else review.flipped_copy(p, decision.flip[p.id])
            for p in pairs if p.id in decision.keep or p.id in decision.flip]
    facts = {"mode": mode, "people_order": people_order, "pairs_selected": len(pairs), "flipped": len(decision.flip),
             "dropped": dict(decision.dropped), "stats": review.public(review.compute(verdicts))}
    return kept, facts


# --- rows and splits -----------------------------------------------------------------------

def _bucket(prompt_id: str) -> float:
    digest = hashlib.sha256(f"{SPLIT_SALT}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_test(prompt_id: str, test_fraction: float) -> bool:
    """Hash bucket of the prompt id: stable as data is added, same answer for every pair of a prompt."""
    return _bucket(prompt_id) < test_fraction


def held_out_prompts(prompt_ids: Iterable[str], test_fraction: float) -> set[str]:
    """The prompts whose rows go to the test splits: those whose hash bucket is under the fraction.

    Few prompts can all hash into train. Then, with at least MIN_PROMPTS_FOR_TEST prompts and a
    fraction worth one prompt or more, the round(n * fraction) prompts with the lowest buckets go to
    test instead (deterministic; the card says so). Later exports with more prompts may give them
    back to train, once the hash rule puts any prompt in test.
    """
    ids = sorted(set(prompt_ids))
    hashed = {p for p in ids if is_test(p, test_fraction)}
    want = round(len(ids) * test_fraction)
    if hashed or len(ids) < MIN_PROMPTS_FOR_TEST or want < 1:
        return hashed
    return set(sorted(ids, key=lambda p: (_bucket(p), p))[:want])


Plan = dict[str, list[PreferencePair]]  # split -> the pairs whose rows it holds, in id order


def plan_splits(sel: Selection, test_fraction: float) -> Plan:
    """Which pair gives a row of which split, sorted by id: everything about the rows but their texts.

    Every selected pair is a *_prefs row; a pair whose chosen reply is one to learn (SFT_METHODS)
    is also a *_sft row, once per chosen reply (pairs of one prompt can share a final revision,
    paired with different rejected answers: SFT wants it once).
    """
    plan: Plan = {name: [] for name in schema.SPLITS}
    sft_seen: set[str] = set()
    test = held_out_prompts((p.prompt_id for p in sel.pairs), test_fraction)
    for p in sorted(sel.pairs, key=lambda p: p.id):
        half = "test" if p.prompt_id in test else "train"
        plan[f"{half}_prefs"].append(p)
        if p.method in SFT_METHODS and p.chosen_id not in sft_seen:
            sft_seen.add(p.chosen_id)
            plan[f"{half}_sft"].append(p)
    return plan


def _provenance(p: PreferencePair) -> dict[str, Any]:
    return {"id": p.id, "prompt_id": p.prompt_id, "method": p.method, "status": p.status,
            "label_prob": float(p.label_prob), "principle_ids": [str(x) for x in p.principle_ids or []],
            "constitution": p.constitution, "constitution_version": p.constitution_version,
            "policy_model": p.policy_model, "judge_model": p.judge_model, "run_id": p.run_id}


def _column_by_ids(session: Session, column: Any, ids: Iterable[str], *also: Any) -> dict[str, Any]:
    """id -> one column of the rows with these ids (never the whole row: a response's conversation
    is far larger than its text), in chunks under SQLite's bound-parameter limit. With `also`
    (more columns of the same table, read in the same query): id -> (column, *also)."""
    key = column.class_.id
    out: dict[str, Any] = {}
    for chunk in _chunks(sorted(set(ids))):
        rows = session.exec(select(key, column, *also).where(col(key).in_(chunk))).all()
        out.update((r[0], tuple(r[1:]) if also else r[1]) for r in rows)
    return out


def iter_rows(session: Session, split: str, pairs: Sequence[PreferencePair], page: int | None = None
              ) -> Iterator[dict[str, Any]]:
    """The rows of one split, in the order of `pairs`, shaped exactly as dataset_schema declares.

    The prompts and response texts are read PAGE pairs at a time, so memory holds one page of
    texts however large the store is.
    """
    page = page or PAGE
    prefs = split.endswith("_prefs")
    for start in range(0, len(pairs), page):
        chunk = pairs[start:start + page]
        prompts = _column_by_ids(session, Prompt.messages, (p.prompt_id for p in chunk))
        # text and finish_reason in one query: a reply the token cap stopped is marked *_cut
        replies = _column_by_ids(session, Response.text, (i for p in chunk
                                                          for i in ((p.chosen_id, p.rejected_id) if prefs
                                                                    else (p.chosen_id,))),
                                 Response.finish_reason)
        texts = {i: text for i, (text, _) in replies.items()}
        cut = {i for i, (_, finish) in replies.items() if schema.is_cut(finish)}
        for p in chunk:
            prompt = schema.messages(prompts[p.prompt_id])
            if prefs:
                yield {"prompt": prompt, "chosen": schema.assistant(texts[p.chosen_id]),
                       "rejected": schema.assistant(texts[p.rejected_id]), "chosen_id": p.chosen_id,
                       "rejected_id": p.rejected_id, "chosen_cut": p.chosen_id in cut,
                       "rejected_cut": p.rejected_id in cut, **_provenance(p)}
            else:
                yield {"messages": prompt + schema.assistant(texts[p.chosen_id]), "response_id": p.chosen_id,
                       "response_cut": p.chosen_id in cut, **_provenance(p)}


def build_rows(session: Session, sel: Selection, test_fraction: float) -> dict[str, list[dict[str, Any]]]:
    """Every row per split as lists, sorted by id (all in memory: for tests and small looks)."""
    return {name: list(iter_rows(session, name, pairs)) for name, pairs in plan_splits(sel, test_fraction).items()}


class _RowsHash:
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


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _padded(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _as_sliced(table: Any, batch: list[dict[str, Any]], after: list[dict[str, Any]], n: int, first: bool):
    """This batch as arrow's IPC writer would see it as a slice of one table of all `n` rows.

    The writer keeps a slice's data buffers up to 64-byte padding, filled by the rows after it
    (here: the next batch), and copies a slice's null bitmap to its exact size, except for a
    first slice whose padded bitmap would reach past the whole table's (then it keeps that
    whole bitmap). A slice that starts past a row it does not hold gets the exact copy.
    """
    if n <= len(batch):  # the whole split in one batch: the whole table, no slice
        return table(batch)
    if first and _padded(-(-len(batch) // 8)) >= -(-n // 8):
        return table(batch + after).slice(0, len(batch))
    return table(batch[:1] + batch + after).slice(1, len(batch))


def to_dataset_dict(session: Session, plan: Plan, staging: Path):
    """A DatasetDict against the schema, its rows streamed from the store into arrow files under
    `staging` (memory-mapped, so no split is ever held in memory), with content fingerprints.

    Byte-identical to building each split as one in-memory table (what export did before it
    streamed; tests compare): `save_to_disk` writes a split by datasets' DEFAULT_MAX_BATCH_SIZE
    rows, each batch a slice of that table, and arrow's IPC writer pads a slice's data buffers to
    64 bytes with the rows that follow it. So each batch here is written as the slice of a table
    that also holds the next batch (two batches in memory at most; `_as_sliced`). The one case
    this cannot reproduce: a column whose next batch holds under 64 bytes while later rows
    hold more; then that buffer's padding differs, never the data read back. Not from_generator: its cache
    can serve stale rows after the store changes. The fingerprint (written to state.json by
    save_to_disk) is a hash of the rows, so two exports of the same data are byte-identical and
    different data never shares a fingerprint. An empty split is left out: `load_from_disk`
    raises IndexError on one and `load_dataset` cannot infer its format, so every client could
    load none of the export.
    """
    from datasets import Dataset, DatasetDict, NamedSplit
    from datasets import config as hf_config
    from datasets.arrow_writer import ArrowWriter

    size = hf_config.DEFAULT_MAX_BATCH_SIZE  # what save_to_disk and to_parquet read by
    out = {}
    for name, features in schema.SPLITS.items():
        if not plan[name]:
            continue
        path = Path(staging) / f"{name}.arrow"
        digest = _RowsHash(schema.SCHEMA_VERSION, name, features.to_dict())

        def table(rows: list[dict[str, Any]], features=features):
            return Dataset.from_dict({column: [r[column] for r in rows] for column in features},
                                     features=features).data.table

        n = len(plan[name])
        writer = ArrowWriter(features=features, path=str(path), writer_batch_size=size)
        try:
            batches = _batches(iter_rows(session, name, plan[name]), size)
            batch, first = next(batches), True
            while batch:
                digest.add_all(batch)
                after = next(batches, [])
                writer.write_table(_as_sliced(table, batch, after, n, first))
                batch, first = after, False
            writer.finalize()
        finally:
            writer.close()
        built = Dataset.from_file(str(path), split=NamedSplit(name))
        out[name] = Dataset(built.data, info=built.info, split=built.split, fingerprint=digest.hexdigest(16))
    return DatasetDict(out)


# --- facts for the card and manifest -------------------------------------------------------

def _iso(dt: datetime | None) -> str | None:
    return _naive_utc(dt).replace(microsecond=0).isoformat() + "Z" if dt else None


def _response_facts(session: Session, ids: Iterable[str]) -> tuple[Counter, Counter, set[str]]:
    """(sampling settings, models, run ids) of these responses, counted a chunk at a time."""
    sampling: Counter = Counter()
    models: Counter = Counter()
    run_ids: set[str] = set()
    for chunk in _chunks(sorted(set(ids))):
        for sampled, model, run_id in session.exec(select(Response.sampling, Response.model, Response.run_id)
                                                   .where(col(Response.id).in_(chunk))):
            sampling[json.dumps(sampled, sort_keys=True)] += 1
            models[model] += 1
            run_ids.add(run_id)
    return sampling, models, run_ids


def _cut_ids(session: Session, ids: Iterable[str]) -> set[str]:
    """The ids among these whose reply the token cap stopped (only those are held), a chunk at a time."""
    out: set[str] = set()
    for chunk in _chunks(sorted(set(ids))):
        out.update(session.exec(select(Response.id).where(
            col(Response.id).in_(chunk), Response.finish_reason == schema.CUT_FINISH_REASON)))
    return out


def cut_counts(plan: Plan, cut: set[str]) -> dict[str, dict[str, int]]:
    """Per split, how many of its replies the token cap stopped: what the *_cut columns hold."""
    return {name: ({"chosen": sum(p.chosen_id in cut for p in pairs),
                    "rejected": sum(p.rejected_id in cut for p in pairs)} if name.endswith("_prefs")
                   else {"response": sum(p.chosen_id in cut for p in pairs)})
            for name, pairs in plan.items()}


def taught_facts(data: Any, per_method: int = 2) -> dict[str, Any]:
    """What the exported pairs teach, read back from the written preference splits a batch at a
    time: per principle the pairs and how many distinct chosen replies they hold (a harmlessness set
    of eight sentences repeated is of little use to anyone), the same overall, and the first pairs
    of each method, texts included, as examples."""
    principles: dict[str, dict[str, Any]] = {}
    distinct: dict[str, set[str]] = {}
    everything: set[str] = set()
    examples: dict[str, list[dict[str, Any]]] = {}
    pairs = 0
    for split in ("train_prefs", "test_prefs"):
        if split not in data:
            continue
        for batch in data[split].select_columns(["prompt", "chosen", "rejected", "principle_ids", "method",
                                                 "id"]).iter(batch_size=1000):
            for prompt, chosen, rejected, pids, method, pid_ in zip(*(batch[k] for k in (
                    "prompt", "chosen", "rejected", "principle_ids", "method", "id")), strict=True):
                pairs += 1
                text = chosen[-1]["content"]
                digest = hashlib.sha256(text.encode()).hexdigest()
                everything.add(digest)
                for pid in pids or ["(none recorded)"]:
                    entry = principles.setdefault(pid, {"pairs": 0, "methods": Counter()})
                    entry["pairs"] += 1
                    entry["methods"][method] += 1
                    distinct.setdefault(pid, set()).add(digest)
                if len(examples.setdefault(method, [])) < per_method:
                    examples[method].append({"id": pid_, "method": method, "principles": list(pids or []),
                                             "prompt": prompt[-1]["content"], "chosen": text,
                                             "rejected": rejected[-1]["content"]})
    for pid, entry in principles.items():
        entry["methods"] = dict(sorted(entry["methods"].items()))
        entry["distinct_chosen"] = len(distinct[pid])
    return {"principles": dict(sorted(principles.items())),
            "variety": {"pairs": pairs, "distinct_chosen": len(everything),
                        "distinct_per_pair": round(len(everything) / pairs, 4) if pairs else None},
            "examples": [ex for m in sorted(examples) for ex in sorted(examples[m], key=lambda e: e["id"])]}


def collect_facts(session: Session, config: ExportConfig, sel: Selection, plan: Plan) -> dict[str, Any]:
    """What the card and manifest say, all taken from the data (no clock), so re-exports match."""
    cv = session.exec(select(ConstitutionVersion).where(
        ConstitutionVersion.name == sel.name, ConstitutionVersion.version == sel.version)).first()
    prefs = plan["train_prefs"] + plan["test_prefs"]
    sampling, response_models, response_runs = _response_facts(
        session, (i for p in sel.pairs for i in (p.chosen_id, p.rejected_id)))
    run_ids = {p.run_id for p in sel.pairs} | response_runs
    runs = _by_ids(session, Run, (i for i in run_ids if i))
    tags = Counter(t for chunk in _chunks(sorted({p.prompt_id for p in sel.pairs}))
                   for t in session.exec(select(PromptTag.tag).where(col(PromptTag.prompt_id).in_(chunk))))
    created = [_naive_utc(p.created_at) for p in sel.pairs]
    test_ids = {p.prompt_id for p in plan["test_prefs"]}
    moved = sorted(p for p in test_ids if not is_test(p, config.test_fraction))
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "generator": "cai-factory export",
        "constitution": {
            "name": sel.name, "version": sel.version, "ref": f"{sel.name}@{sel.version}",
            "sha256": cv.sha256 if cv else None, "source_path": cv.source_path if cv else None,
            "source_text": cv.source_text if cv else None,
            "principles": sorted(k for k in (cv.principle_hashes if cv else {}) if not k.startswith("pref:")),
        },
        "command": command_line(config),
        "format": config.format,
        "license": config.license,
        "selection": {
            "constitution": config.constitution, "methods": list(config.methods), "tags": list(config.tags),
            "min_label_prob": config.min_label_prob, "min_margin": config.min_margin,
            "since": _iso(config.since), "until": _iso(config.until), "include_ties": config.include_ties,
            "include_inconsistent": config.include_inconsistent,
            "include_quarantined": config.include_quarantined,
            "reviewed": None if config.reviewed == "any" else config.reviewed, "people_order": config.people_order,
            "pairs_available": sel.available, "pairs_selected": len(sel.pairs),
            "removed_by": dict(sel.removed),
        },
        "test_fraction": config.test_fraction,
        "split_rule": f"test if sha256('{SPLIT_SALT}:' + prompt_id)[:8 bytes] / 2**64 < test_fraction",
        # the hash put no prompt in test: these (lowest buckets) were moved there, see held_out_prompts
        "moved_to_test": moved,
        "counts": {name: len(r) for name, r in plan.items()},
        "splits_written": [name for name in schema.SPLITS if plan[name]],
        "counts_by_method": {name: dict(sorted(Counter(p.method for p in r).items()))
                             for name, r in plan.items()},
        "counts_by_status": dict(sorted(Counter(p.status for p in prefs).items())),
        # replies the generator's token cap stopped, per split (the rows' *_cut columns)
        "cut": cut_counts(plan, _cut_ids(session, (i for p in sel.pairs for i in (p.chosen_id, p.rejected_id)))),
        "prompts": {half: len({p.prompt_id for p in plan[f"{half}_prefs"]}) for half in ("train", "test")},
        "label_prob": {"all": label_prob_stats([float(p.label_prob) for p in prefs])} | {
            m: label_prob_stats([float(p.label_prob) for p in prefs if p.method == m])
            for m in sorted({p.method for p in prefs})},
        "models": {
            "policy": dict(sorted(Counter(p.policy_model for p in sel.pairs).items())),
            "responses": dict(sorted(response_models.items())),
            "judge": dict(sorted(Counter(p.judge_model for p in sel.pairs if p.judge_model).items())),
        },
        "sampling": [{"settings": json.loads(k), "responses": n} for k, n in sorted(sampling.items())],
        "runs": [{"id": r.id, "flow": r.flow, "model": r.model, "engine": r.engine,
                  "engine_facts": (r.summary or {}).get("engine") or {},
                  "constitution_version": r.constitution_version, "config": r.config}
                 for r in sorted(runs.values(), key=lambda r: r.id)],
        "principles_used": dict(sorted(Counter(i for p in sel.pairs for i in p.principle_ids or []).items())),
        "prompt_tags": dict(sorted(tags.items())),
        "created": {"first": _iso(min(created)), "last": _iso(max(created))},
        "review": sel.review,
    }


def build_export(session: Session, config: ExportConfig, staging: Path | None = None):
    """(DatasetDict, facts): the heart of the export, what tests call.

    The DatasetDict's arrow files go under `staging` (the caller removes it once they are
    written out); without one, a temporary directory removed when the DatasetDict is collected.
    """
    sel = select_pairs(session, config)
    plan = plan_splits(sel, config.test_fraction)
    facts = collect_facts(session, config, sel, plan)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix="cai-export-rows-"))
        data = to_dataset_dict(session, plan, staging)
        weakref.finalize(data, shutil.rmtree, staging, ignore_errors=True)
    else:
        data = to_dataset_dict(session, plan, staging)
    return data, facts | taught_facts(data)


def staging_dir(out: Path) -> Path:
    """A fresh directory beside `out` (same disk, never a fixed name that could be a person's) for
    the rows while they are written: not the system temp dir, which may be memory (tmpfs)."""
    base = Path(out).resolve()
    base.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{base.name}.rows-", dir=base.parent))


# --- checks before a flow run --------------------------------------------------------------

def preflight(config: ExportConfig) -> None:
    """The checks that need no Prefect, so bad input fails in a second, before a flow run starts."""
    check_out(Path(config.out))
    if config.push_to_hub:
        hub_token(config.push_to_hub)
    with session_scope() as s:
        select_pairs(s, config)


# --- the Prefect flow ----------------------------------------------------------------------
# Thin: each task wraps one function above; the flow records a Run row and returns a summary.

# log_prints=False: under a parent flow with log_prints (the pipeline), Prefect's print capture
# defeats dill's stdout capture of dis.dis() inside datasets' fingerprinting, and every
# disassembled line would land in the run log
@stage_task(name="export-build", log_prints=False)
def build_task(config: ExportConfig, run_id: str, staging: Path):
    with session_scope() as s:
        data, facts = build_export(s, config, staging)
        run = s.get(Run, run_id)
        if run is not None:  # so `cai status` shows which version this run exported
            run.constitution = facts["constitution"]["name"]
            run.constitution_version = facts["constitution"]["version"]
            s.add(run)
    return data, facts


@stage_task(name="export-write", log_prints=False)
def write_task(data, facts: dict[str, Any], config: ExportConfig) -> dict[str, Any]:
    return write_export(data, facts, config.out, config.format)


@stage_task(name="export-push", log_prints=False)
def push_task(config: ExportConfig, ref: str) -> str:
    return push_export(config.out, config.push_to_hub or "", config.private, f"cai export {ref}")


@stage_flow(name="export", log_prints=False)
def export_flow(config: ExportConfig) -> dict[str, Any]:
    """Select pairs, build the DatasetDict, write it with its card, then push if asked."""
    log = run_logger()
    log.info("export config: %s", config.model_dump_json())
    timer = Timer()
    with recorded_run("export", config.model_dump(mode="json")) as run:
        run.summary = {"run_id": run.id, "out": str(config.out), "format": config.format}
        run.timings = timer.totals
        staging = staging_dir(config.out)
        try:
            with timer("build"):
                data, facts = build_task(config, run.id, staging)
            run.summary |= {"constitution": facts["constitution"]["ref"], "counts": facts["counts"]}
            log.info("export %s: %s", facts["constitution"]["ref"], facts["counts"])
            if config.test_fraction > 0 and not facts["counts"]["test_sft"] and not facts["counts"]["test_prefs"]:
                # the split is by prompt hash: with few prompts the test bucket can be empty, by design
                run.summary["warning"] = (
                    f"the test splits are empty: none of the {facts['prompts']['train']} prompts hashed into "
                    f"the test bucket (--test-fraction {config.test_fraction}); more prompts or a larger "
                    "--test-fraction fill it")
                log.warning(run.summary["warning"])
            with timer("write"):
                write_task(data, facts, config)
            if config.push_to_hub:
                with timer("push"):
                    run.summary["url"] = push_task(config, facts["constitution"]["ref"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    try:  # the Run row is closed: fold SQLite's WAL into cai.db, so a copy of that one file has every row
        checkpoint_wal()
    except Exception as exc:  # noqa: BLE001 - the export is written; a reader holding the log is no failure
        log.warning("could not checkpoint the SQLite write-ahead log (%s); copy cai.db-wal along with cai.db", exc)
    return run.summary
