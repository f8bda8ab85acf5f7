"""What every flow shares: constitutions by reference, bundled prompt sets, run logs and one-line errors.

Kept deliberately flat (no base classes): each flow imports the two or three helpers it needs.
Run rows live in `store.runs` (`recorded_run`), id-existence queries in `store.queries`, the engine
cache in `flows.engine_cache`, the pair gates in `cai.quality`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlmodel import Session, select

from cai.errors import UserError
from cai.prompts import BUNDLED, DATA_DIR, parse_file
from constitution.load import Constitution, ConstitutionError, find, load_file, parse_text, split_ref
from store import queries
from store.db import session_scope
from store.models import ConstitutionVersion
from store.upsert import insert_ignore

__all__ = ["UserError", "resolve_constitution", "ensure_tags", "worker_id", "run_logger"]


def record_constitution(session: Session, c: Constitution) -> None:
    """Remember this version's full text (a no-op if the store has seen it)."""
    insert_ignore(session, ConstitutionVersion, [ConstitutionVersion(
        name=c.name, version=c.version, sha256=c.sha256, canonical=c.canonical, source_text=c.source_text,
        source_path=c.source_path, principle_hashes=c.principle_hashes())])


def resolve_constitution(session: Session, ref: str, record: bool = True) -> Constitution:
    """`harmless` (the file as it is now), `harmless@3f2a9c1b` (a stored version) or a path."""
    name, version = split_ref(ref)
    if version:
        rows = session.exec(select(ConstitutionVersion).where(ConstitutionVersion.name == name)).all()
        match = [r for r in rows if r.version.startswith(version) or r.sha256.startswith(version)]
        if not match:
            try:  # the file on disk may be that version even if the store has not seen it yet
                c = load_file(find(name))
                if c.version.startswith(version):
                    if record:
                        record_constitution(session, c)
                    return c
            except ConstitutionError:
                pass
            known = ", ".join(r.version for r in rows) or "none stored"
            raise UserError(f"constitution {ref}: no such version (known versions of {name!r}: {known}; "
                            f"see `cai constitution log {name}`)")
        if len(match) > 1:
            raise UserError(f"constitution {ref}: ambiguous version prefix, matches "
                            f"{', '.join(r.version for r in match)}")
        return parse_text(match[0].source_text, f"{name}@{match[0].version} (stored)")
    try:
        c = load_file(find(name))
    except ConstitutionError as exc:
        raise UserError(str(exc)) from None
    if record:
        record_constitution(session, c)
    return c


def ensure_tags(session: Session, tags: list[str]) -> None:
    """Import a bundled prompt set the first time its tag is used; raise on an unknown tag."""
    for tag in tags:
        if queries.has_tag(session, tag):
            continue
        if tag in BUNDLED:
            res = parse_file(DATA_DIR / BUNDLED[tag])
            queries.store_prompts(session, res.prompts, f"data/{BUNDLED[tag]}", [tag])
            continue
        known = sorted(set(BUNDLED) | queries.known_tags(session))
        raise UserError(f"no prompts tagged {tag!r} (known tags: {', '.join(known)}); "
                        f"add some with `cai prompts add FILE --tag {tag}`")


def load_prompts(session_url: str | None, tags: list[str], limit: int | None = None) -> list:
    """Prompts of `tags` (bundled sets imported on first use), first `limit` by id."""
    with session_scope(session_url) as s:
        ensure_tags(s, tags)
    with session_scope(session_url) as s:
        prompts = queries.prompts_for_tags(s, tags)
    return prompts[:limit] if limit else prompts


def governance(session: Session, refs: list[str]):
    """The constitutions of a run (each resolved and recorded as `resolve_constitution` does) as one
    Governance: which principle governs which prompts, and what refusals they teach."""
    from constitution.govern import Governance

    return Governance([resolve_constitution(session, ref) for ref in refs])


def taught(gov) -> Any:
    """The refusal detector's extra knowledge for a run: every refusal its constitutions teach."""
    from cai.refusal import Taught

    return Taught.of(gov.taught_refusals())


def regate(url: str | None = None) -> dict[str, int]:
    """Assess the stored `ok` pairs made before the quality gates (a reply without quality figures):
    the status each would get if made now, under the constitution version it was made with; what
    `cai db regate` runs once after an upgrade. Returns {"checked": n, status: pairs moved to it}."""
    from cai.quality import pair_status
    from constitution.govern import Governance
    from store.models import PreferencePair, Prompt, Response

    counts: dict[str, int] = {"checked": 0}
    govs: dict[str, Any] = {}
    with session_scope(url) as s:
        pairs = s.exec(select(PreferencePair).where(PreferencePair.status == "ok")).all()
        for pair in pairs:
            chosen, rejected = s.get(Response, pair.chosen_id), s.get(Response, pair.rejected_id)
            prompt = s.get(Prompt, pair.prompt_id)
            if chosen is None or rejected is None or prompt is None or (chosen.quality and rejected.quality):
                continue  # made with the gates: its status is already theirs
            counts["checked"] += 1
            ref = f"{pair.constitution}@{pair.constitution_version}" if pair.constitution_version else pair.constitution
            if ref not in govs:
                try:
                    govs[ref] = Governance([resolve_constitution(s, ref, record=False)]) if ref else None
                except UserError:  # a version nobody stored: the gates without the stance check
                    govs[ref] = None
            gov = govs[ref]
            refuse = gov.refuse(prompt.category, queries.tags_of(s, [prompt.id])[prompt.id]) if gov else None
            status = pair_status(prompt, chosen, rejected, refuse, taught(gov) if gov else None)
            if status != "ok":
                pair.status = status
                s.add(pair)
                counts[status] = counts.get(status, 0) + 1
    return counts


def worker_id() -> str:
    """host:pid:thread, so claims of a dead local process can be recognised and taken over."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


def run_logger(fallback: logging.Logger | None = None) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; `fallback` (default: the `cai` logger) outside one."""
    import sys

    if "prefect" not in sys.modules:  # a plain run (flows/orchestration.py): no Prefect to ask
        return fallback or logging.getLogger("cai")
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        return fallback or logging.getLogger("cai")


class Timer:
    """Accumulates seconds per named phase (engine calls vs everything else)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


# --- our errors are one line in Prefect's run logs too ----------------------------------

def ours(exc: BaseException) -> bool:
    """Is `exc` one of our own errors a person can act on? Only those become one line: an
    IndexError or KeyError is a bug, and its traceback is what a bug report needs.
    CheckpointError is looked up only if training.checkpoint was imported (it imports torch), since
    otherwise nothing could have raised it."""
    import sys

    from engines.bundled import ModelNotFound
    from store.db import DatabaseError

    types: tuple[type[BaseException], ...] = (UserError, DatabaseError, ConstitutionError, ModelNotFound)
    checkpoint = sys.modules.get("training.checkpoint")
    if checkpoint is not None:
        types += (checkpoint.CheckpointError,)
    return isinstance(exc, types)


class _NoTracebackForOurs:
    """A logging filter: a record carrying one of our errors (`ours`) keeps its one-line message and
    loses its traceback. Prefect's engines log every exception a task or flow raises with its
    traceback, on the console and into the run's logs; for a read-only or locked database met
    mid-run that buried the one line `guarded` prints. A bug's traceback is left as it is."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and ours(exc):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


# where Prefect logs a failed task or flow run (the run loggers) and an engine that gave up
PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")
_ONE_LINE = _NoTracebackForOurs()


def quiet_our_tracebacks() -> None:
    """Install the filter on Prefect's run loggers (once). Logger filters survive Prefect's own
    logging setup (dictConfig replaces handlers, not filters), so this may run before Prefect is imported."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)


# Installed on import, not only by `cai`'s guard: a run served by `cai schedule` runs in a process
# Prefect spawns, which imports the flow's module (and so this one) but never runs the guard.
quiet_our_tracebacks()
