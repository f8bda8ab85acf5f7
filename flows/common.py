"""What every flow shares: constitutions by reference, bundled prompt sets, the engine cache.

Kept deliberately flat (no base classes): each flow imports the two or three helpers it needs.
Run rows live in `store.runs` (`recorded_run`), id-existence queries in `store.queries`.
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
from engines.bundled import DEFAULT_SPEC
from store import queries
from store.db import session_scope
from store.models import ConstitutionVersion
from store.upsert import insert_ignore

__all__ = ["UserError", "resolve_constitution", "ensure_tags", "cached_engine", "worker_id", "run_logger"]


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


def pair_status(prompt: Any, chosen: Any, rejected: Any, refuse: bool | None, taught_refusals: Any = None) -> str:
    """"ok", or the gate status (cai.quality.gate_pair) that keeps a pair out of training and export.

    `refuse` is the stance the prompt's governing principle declares (constitution/govern.py; None:
    nothing governs it, so no stance is checked). Rows stored before gates existed have no quality
    figures: they are assessed here, knowing the constitutions' own refusals.
    """
    from cai.quality import assess, from_dict, gate_pair

    def q(r):
        return (from_dict(r.quality) if r.quality
                else assess(prompt.text, r.text, r.finish_reason, taught_refusals))

    return gate_pair(q(chosen), q(rejected), refuse) or "ok"


def worker_id() -> str:
    """host:pid:thread, so claims of a dead local process can be recognised and taken over."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


_ENGINES: dict[tuple, Any] = {}
_ENGINE_LOCK = threading.Lock()


def _engine_key(spec: str, backend: str, settings: dict[str, Any]) -> tuple:
    return spec, backend, tuple(sorted(settings.items()))


def cached_engine(spec: str, backend: str = "auto", *, job_tokens: int | None = None, job_scorings: int = 0,
                  **settings: Any):
    """Load an engine once per process: tasks call this instead of taking a model as input.

    job_tokens / job_scorings: the size of the job the first caller is about to run (new tokens
    at most, choice scorings), which `auto` weighs (engines.choose_backend); later calls reuse
    the engine whatever they pass."""
    key = _engine_key(spec, backend, settings)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            from engines import load

            t0 = time.perf_counter()
            job = {"job_tokens": job_tokens, "job_scorings": job_scorings} if backend == "auto" else {}
            try:
                _ENGINES[key] = load(spec, engine=backend, **job, **settings)
            except Exception as exc:  # noqa: BLE001 - one line a person can act on
                why = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if backend == "openai" or settings.get("base_url"):  # a remote endpoint: the message says what
                    raise UserError(f"engine openai for model {spec!r}: {why}") from exc
                raise UserError(f"cannot load model {spec!r} ({why}); pass a local HF directory, "
                                f"a .gguf file, or `{DEFAULT_SPEC}` for the bundled model") from exc
            facts = engine_facts(_ENGINES[key])
            run_logger().info("loaded %s in %.1fs: %s", spec, time.perf_counter() - t0,
                               ", ".join(f"{k} {v}" for k, v in facts.items()))
            if why := (getattr(getattr(_ENGINES[key], "stats", None), "extra", None) or {}).get("auto"):
                run_logger().info("engine auto chose %s: %s", facts["backend"], why)
        return _ENGINES[key]


def engine_facts(engine: Any) -> dict[str, Any]:
    """Backend, device and dtype of a loaded engine: what a run should record about how it computed."""
    extra = getattr(getattr(engine, "stats", None), "extra", None) or {}
    return {"backend": getattr(engine, "backend", "?")} | {k: extra[k] for k in ("device", "dtype") if k in extra}


def machine_facts() -> dict[str, Any]:
    """The CPU a run computed on, as a report should name it: bf16 kernels (AMX, AVX-512 BF16)
    round differently, so a bf16 figure belongs to its CPU."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    facts = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def loaded_engine_facts(spec: str, backend: str = "auto", **settings: Any) -> dict[str, Any] | None:
    """engine_facts of the engine `cached_engine` holds for these arguments; None if never loaded."""
    with _ENGINE_LOCK:
        eng = _ENGINES.get(_engine_key(spec, backend, settings))
    return engine_facts(eng) if eng is not None else None


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


def register_engine(spec: str, engine: Any, backend: str = "auto", **settings: Any) -> None:
    """Make `cached_engine(spec, ...)` return `engine` (tests plug in scripted engines this way)."""
    with _ENGINE_LOCK:
        _ENGINES[_engine_key(spec, backend, settings)] = engine


def is_loaded(spec: str) -> bool:
    """Does this process hold an engine for `spec` already (loaded, or registered by a caller)?"""
    with _ENGINE_LOCK:
        return any(key[0] == spec for key in _ENGINES)


def drop_engines() -> None:
    with _ENGINE_LOCK:
        for eng in _ENGINES.values():
            try:
                eng.close()
            except Exception:  # noqa: BLE001
                pass
        _ENGINES.clear()


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
    CheckpointError is looked up only if dpo.checkpoint was imported (it imports torch), since
    otherwise nothing could have raised it."""
    import sys

    from engines.bundled import ModelNotFound
    from store.db import DatabaseError

    types: tuple[type[BaseException], ...] = (UserError, DatabaseError, ConstitutionError, ModelNotFound)
    checkpoint = sys.modules.get("dpo.checkpoint")
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
