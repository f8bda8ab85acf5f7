"""Run records: one `Run` row per flow run, opened, summarised and closed in one place.

    with recorded_run("generate", cfg.model_dump(), model=cfg.model, url=url) as run:
        ...
        run.summary = {...}          # stored when the block ends
        run.timings = {...}

A block that raises marks the row `failed` with the error in its summary (and re-raises), or
`stopped` when a signal stopped it (store/stop.py); one
that ends normally records `run.status` (default `completed`) with the summary and timings it set.
A killed process closes nothing: its row says `host:pid`, and the next run (or `cai status`) on
that host that finds the process gone marks the row `crashed`, and its `running` TrainingRun with it.
A training flow opens its TrainingRun inside the block: a failed or stopped Run closes it the same way.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from store.db import mask_secrets, session_scope
from store.models import Run, TrainingRun, utcnow
from store.stop import is_stop
from store.work import dead_local


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
        mark_crashed(s)
        s.add(Run(id=run_id, flow=flow, config=mask_secrets(config), model=model, engine=engine,  # never a password
                  constitution=constitution.name if constitution else "",
                  constitution_version=constitution.version if constitution else "",
                  host=f"{socket.gethostname()}:{os.getpid()}"))  # host:pid, so a dead process is recognised
    return run_id


def mark_crashed(session: Session) -> int:
    """Mark `crashed` every `running` Run of this host whose process is gone; returns how many.

    Only this host's processes can be checked; a run on another machine stays `running` until
    one there looks. Leaves the commit to the caller.
    """
    host = socket.gethostname()
    rows = session.exec(select(Run).where(Run.status == "running", col(Run.host).startswith(f"{host}:"))).all()
    gone = [r for r in rows if dead_local(r.host)]
    for r in gone:
        r.status = "crashed"
        r.finished_at = utcnow()
        r.summary = {**(r.summary or {}), "error": f"the process {r.host} ended without closing this run "
                                                   "(killed, or its machine went down)"}
        session.add(r)
    session.flush()
    close_orphans(session)
    return len(gone)


def close_orphans(session: Session) -> int:
    """Rows that live as long as a Run (a TrainingRun) follow it: a `running` one whose Run has
    ended `crashed` or `failed` without closing it (killed mid-training, or the store refused
    the closing write) takes that status. Returns how many; leaves the commit to the caller."""
    rows = session.exec(select(TrainingRun, Run.status).join(Run, TrainingRun.run_id == Run.id)
                        .where(TrainingRun.status == "running",
                               col(Run.status).in_(("crashed", "failed", "stopped")))).all()
    for row, status in rows:
        row.status, row.finished_at = status, utcnow()
        row.final_metrics = {**(row.final_metrics or {}), "error": f"its run {row.run_id} ended {status} "
                                                                   "before the training run was closed"}
        session.add(row)
    return len(rows)


def finish_run(run_id: str, status: str, summary: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None, url: str | None = None) -> None:
    """Close the Run row; one that ends `failed` or `stopped` takes its `running` TrainingRun with it
    (close_orphans), so a training flow closes both through `recorded_run`."""
    with session_scope(url) as s:
        run = s.get(Run, run_id)
        if run is None:
            return
        run.status = status
        run.summary = mask_secrets(summary or {})  # an error message may quote a URL
        run.timings = timings or {}
        run.finished_at = utcnow()
        s.add(run)
        if status in ("failed", "stopped"):
            s.flush()
            close_orphans(s)


@contextmanager
def recorded_run(flow: str, config: dict[str, Any], model: str = "", engine: str = "", constitution: Any = None,
                 url: str | None = None) -> Iterator[OpenRun]:
    """Open a Run row, yield it, and close it `completed` or `failed` (the summary survives either way).

    A run whose config asks for a dry run (runner.dry_run: it only estimates) is closed `dry-run`."""
    run = OpenRun(start_run(flow, config, model=model, engine=engine, constitution=constitution, url=url))
    if (config.get("runner") or {}).get("dry_run"):
        run.status = "dry-run"
    try:
        yield run
    except BaseException as exc:
        if is_stop(exc):  # SIGTERM / Ctrl-C: what was committed stays, a rerun does the rest
            run.summary.setdefault("stopped", str(exc) or exc.__class__.__name__)
            status = "stopped"
        else:
            run.summary.setdefault("error", f"{exc.__class__.__name__}: {exc}")
            status = "failed"
        finish_run(run.id, status, summary=run.summary, timings=run.timings, url=url)
        raise
    finish_run(run.id, run.status, summary=run.summary, timings=run.timings, url=url)
