"""`cai status`: what the store holds, per table and per stage, and what failed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from store.db import current_revision
from store.ledger import per_run
from store.models import (
    Claim,
    ConstitutionVersion,
    EvalResult,
    Failure,
    Judgment,
    PreferencePair,
    Prompt,
    PromptTag,
    RedteamAttack,
    RedteamCandidate,
    RefLogp,
    Response,
    Review,
    Run,
    Spend,
    TaxonomyVersion,
    TrainingRun,
    TrainingStep,
    WorkProgress,
)
from store.runs import mark_crashed

# every table of store/models.py (tests/test_hardening_inputs.py checks none is left out)
TABLES = [ConstitutionVersion, Prompt, PromptTag, Run, Response, Judgment, PreferencePair, Review, RefLogp,
          TrainingRun, TrainingStep, EvalResult, TaxonomyVersion, RedteamCandidate, RedteamAttack, Failure, Claim,
          WorkProgress, Spend]


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
    data["principles"] = pairs_per_principle(session)
    data["prompt_tags"] = dict(session.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag)
                                            .order_by(PromptTag.tag)).all())
    data["failures"] = {
        "retrying": count(Failure, Failure.quarantined == False),  # noqa: E712
        "quarantined": count(Failure, Failure.quarantined == True),  # noqa: E712
        "items": [{"stage": f.stage, "key": f.item_key, "attempts": f.attempts, "quarantined": f.quarantined,
                   "error": f.error.splitlines()[0][:200] if f.error else ""}
                  for f in session.exec(select(Failure).order_by(Failure.updated_at.desc()).limit(20))],
    }
    data["workers"] = workers(session)
    runs = list(session.exec(select(Run).order_by(Run.started_at.desc()).limit(10)))
    spend = per_run(session, [r.id for r in runs])
    data["runs"] = [{"id": r.id[:12], "flow": r.flow, "status": r.status, "model": r.model,
                     "constitution": f"{r.constitution}@{r.constitution_version}" if r.constitution else "",
                     "started_at": r.started_at.isoformat(timespec="seconds"),
                     "finished_at": r.finished_at.isoformat(timespec="seconds") if r.finished_at else None,
                     "spend": spend.get(r.id)}
                    for r in runs]
    return data


def pairs_per_principle(session: Session) -> list[dict[str, Any]]:
    """Per constitution and principle that produced them: the pairs, how many are `ok` (they train
    and export) and how many the gates or the judge kept out. A pair made under two principles counts
    for each. The principle ids are a JSON list, so they are counted here, a column pair at a time."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    rows = session.exec(select(PreferencePair.constitution, PreferencePair.principle_ids, PreferencePair.status)
                        .execution_options(yield_per=5000))
    for constitution, pids, status in rows:
        for pid in pids or ["(none recorded)"]:
            c = counts.setdefault((constitution or "", pid), {"pairs": 0, "ok": 0})
            c["pairs"] += 1
            c["ok"] += status == "ok"
    return [{"constitution": c, "principle": p, "pairs": n["pairs"], "ok": n["ok"], "kept_out": n["pairs"] - n["ok"]}
            for (c, p), n in sorted(counts.items())]


def workers(session: Session) -> list[dict[str, Any]]:
    """Per Prefect worker and host: runs (and how many are still running), items claimed, done and
    failed, and the claims it holds right now (a claim's worker is host:pid:thread, a run's host:pid)."""
    rows = session.exec(select(WorkProgress.worker, WorkProgress.host, WorkProgress.run_id, Run.status, Run.host,
                               func.sum(WorkProgress.claimed), func.sum(WorkProgress.done),
                               func.sum(WorkProgress.failed), func.max(WorkProgress.updated_at))
                        .join(Run, Run.id == WorkProgress.run_id, isouter=True)
                        .group_by(WorkProgress.worker, WorkProgress.host, WorkProgress.run_id, Run.status,
                                  Run.host)).all()
    holding: dict[str, int] = {}
    for (w,) in session.exec(select(Claim.worker)).all() if rows else ():
        key = ":".join(str(w).split(":")[:2])  # host:pid of the process holding it
        holding[key] = holding.get(key, 0) + 1
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for worker, host, _run, status, run_host, claimed, done, failed, seen in rows:
        w = out.setdefault((worker, host), {"worker": worker, "host": host, "runs": 0, "running": 0, "claimed": 0,
                                            "done": 0, "failed": 0, "holding": 0, "last_seen": None})
        w["runs"] += 1
        w["running"] += status == "running"
        w["claimed"] += int(claimed or 0)
        w["done"] += int(done or 0)
        w["failed"] += int(failed or 0)
        w["holding"] += holding.get(run_host or "", 0)
        if seen is not None and (w["last_seen"] is None or seen.isoformat(timespec="seconds") > w["last_seen"]):
            w["last_seen"] = seen.isoformat(timespec="seconds")
    return sorted(out.values(), key=lambda w: (w["host"], w["worker"]))
