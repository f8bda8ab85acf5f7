"""Small utilities every flow shares: constitutions by reference, run rows, the engine cache.

Kept deliberately flat (no base classes): each flow imports the two or three helpers it needs.
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

from constitution.load import Constitution, ConstitutionError, find, load_file, parse_text, split_ref
from store.db import session_scope
from store.models import ConstitutionVersion, Run, utcnow
from store.upsert import insert_ignore


class UserError(Exception):
    """Bad input a person can fix (unknown name, bad file, unreachable database): exit code 2."""


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


def worker_id() -> str:
    """host:pid:thread, so claims of a dead local process can be recognised and taken over."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


def start_run(flow: str, config: dict[str, Any], model: str = "", engine: str = "",
              constitution: Constitution | None = None, url: str | None = None) -> str:
    import uuid

    run_id = uuid.uuid4().hex
    with session_scope(url) as s:
        s.add(Run(id=run_id, flow=flow, config=config, model=model, engine=engine,
                  constitution=constitution.name if constitution else "",
                  constitution_version=constitution.version if constitution else "", host=socket.gethostname()))
    return run_id


def finish_run(run_id: str, status: str, summary: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None, url: str | None = None) -> None:
    with session_scope(url) as s:
        run = s.get(Run, run_id)
        if run is None:
            return
        run.status = status
        run.summary = summary or {}
        run.timings = timings or {}
        run.finished_at = utcnow()
        s.add(run)


_ENGINES: dict[tuple, Any] = {}
_ENGINE_LOCK = threading.Lock()


def _engine_key(spec: str, backend: str, settings: dict[str, Any]) -> tuple:
    return spec, backend, tuple(sorted(settings.items()))


def cached_engine(spec: str, backend: str = "auto", **settings: Any):
    """Load an engine once per process: tasks call this instead of taking a model as input."""
    key = _engine_key(spec, backend, settings)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            from engines import load

            t0 = time.perf_counter()
            try:
                _ENGINES[key] = load(spec, engine=backend, **settings)
            except Exception as exc:  # noqa: BLE001 - one line a person can act on
                raise UserError(f"cannot load model {spec!r} ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local HF directory, "
                                "a .gguf file, or `smollm2-135m` for the bundled model") from exc
            facts = engine_facts(_ENGINES[key])
            run_logger().info("loaded %s in %.1fs: %s", spec, time.perf_counter() - t0,
                               ", ".join(f"{k} {v}" for k, v in facts.items()))
        return _ENGINES[key]


def engine_facts(engine: Any) -> dict[str, Any]:
    """Backend, device and dtype of a loaded engine: what a run should record about how it computed."""
    extra = getattr(getattr(engine, "stats", None), "extra", None) or {}
    return {"backend": getattr(engine, "backend", "?")} | {k: extra[k] for k in ("device", "dtype") if k in extra}


def loaded_engine_facts(spec: str, backend: str = "auto", **settings: Any) -> dict[str, Any] | None:
    """engine_facts of the engine `cached_engine` holds for these arguments; None if never loaded."""
    with _ENGINE_LOCK:
        eng = _ENGINES.get(_engine_key(spec, backend, settings))
    return engine_facts(eng) if eng is not None else None


def run_logger(fallback: logging.Logger | None = None) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; `fallback` (default: the `cai` logger) outside one."""
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        return fallback or logging.getLogger("cai")


def register_engine(spec: str, engine: Any, backend: str = "auto", **settings: Any) -> None:
    """Make `cached_engine(spec, ...)` return `engine` (tests plug in scripted engines this way)."""
    with _ENGINE_LOCK:
        _ENGINES[_engine_key(spec, backend, settings)] = engine


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
