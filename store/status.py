"""`cai status`: what the store holds, per table and per stage, and what failed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from store.db import current_revision
from store.models import (
    Claim,
    ConstitutionVersion,
    EvalResult,
    Failure,
    Judgment,
    PreferencePair,
    Prompt,
    PromptTag,
    RefLogp,
    Response,
    Run,
    TrainingRun,
    TrainingStep,
)
from store.runs import mark_crashed

TABLES = [ConstitutionVersion, Prompt, PromptTag, Run, Response, Judgment, PreferencePair, RefLogp,
          TrainingRun, TrainingStep, EvalResult, Failure, Claim]


def collect(session: Session) -> dict[str, Any]:
    mark_crashed(session)  # a killed run's row would say `running` for ever
    session.flush()

    def count(model, *where) -> int:
        return session.exec(select(func.count()).select_from(model).where(*where)).one()

    data: dict[str, Any] = {
        "database": session.get_bind().url.render_as_string(hide_password=True),
        "schema_revision": current_revision(session.get_bind()),
        "tables": {m.__tablename__: count(m) for m in TABLES},
    }
    data["responses"] = {
        f"{k}" + (f"_{r}" if k in ("critique", "revision") else ""): n for k, r, n in session.exec(
            select(Response.kind, Response.round, func.count()).group_by(Response.kind, Response.round)
            .order_by(Response.kind, Response.round))}
    data["pairs"] = [{"constitution": f"{c}@{v}", "method": m, "status": st, "count": n} for c, v, m, st, n in
                     session.exec(select(PreferencePair.constitution, PreferencePair.constitution_version,
                                         PreferencePair.method, PreferencePair.status, func.count())
                                  .group_by(PreferencePair.constitution, PreferencePair.constitution_version,
                                            PreferencePair.method, PreferencePair.status))]
    data["prompt_tags"] = dict(session.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag)
                                            .order_by(PromptTag.tag)).all())
    data["failures"] = {
        "retrying": count(Failure, Failure.quarantined == False),  # noqa: E712
        "quarantined": count(Failure, Failure.quarantined == True),  # noqa: E712
        "items": [{"stage": f.stage, "key": f.item_key, "attempts": f.attempts, "quarantined": f.quarantined,
                   "error": f.error.splitlines()[0][:200] if f.error else ""}
                  for f in session.exec(select(Failure).order_by(Failure.updated_at.desc()).limit(20))],
    }
    data["runs"] = [{"id": r.id[:12], "flow": r.flow, "status": r.status, "model": r.model,
                     "constitution": f"{r.constitution}@{r.constitution_version}" if r.constitution else "",
                     "started_at": r.started_at.isoformat(timespec="seconds"),
                     "finished_at": r.finished_at.isoformat(timespec="seconds") if r.finished_at else None}
                    for r in session.exec(select(Run).order_by(Run.started_at.desc()).limit(10))]
    return data
