"""Run records: one `Run` row per flow run, opened, summarised and closed in one place.

    with recorded_run("generate", cfg.model_dump(), model=cfg.model, url=url) as run:
        ...
        run.summary = {...}          # stored when the block ends
        run.timings = {...}

A block that raises marks the row `failed` with the error in its summary (and re-raises); one
that ends normally records `run.status` (default `completed`) with the summary and timings it set.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from store.db import session_scope
from store.models import Run, utcnow


@dataclass
class OpenRun:
    id: str
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "completed"  # what a block that ends normally records; a flow may set "failed"


def start_run(flow: str, config: dict[str, Any], model: str = "", engine: str = "", constitution: Any = None,
              url: str | None = None) -> str:
    """A `running` Run row; `constitution` is anything with `.name` and `.version` (or None)."""
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


@contextmanager
def recorded_run(flow: str, config: dict[str, Any], model: str = "", engine: str = "", constitution: Any = None,
                 url: str | None = None) -> Iterator[OpenRun]:
    """Open a Run row, yield it, and close it `completed` or `failed` (the summary survives either way)."""
    run = OpenRun(start_run(flow, config, model=model, engine=engine, constitution=constitution, url=url))
    try:
        yield run
    except BaseException as exc:
        run.summary.setdefault("error", f"{exc.__class__.__name__}: {exc}")
        finish_run(run.id, "failed", summary=run.summary, timings=run.timings, url=url)
        raise
    finish_run(run.id, run.status, summary=run.summary, timings=run.timings, url=url)
